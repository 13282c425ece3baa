#!/usr/bin/env bash
# The two proxy probes (5,000 train, 2,000 val / test images), run after sweep.sh
export OMP_NUM_THREADS=1
for r in runs/L4_E64_lr3e-3 runs/L4_E128_lr3e-3; do
  /usr/bin/time -f "$r %e s wall" igpt-fast probe $r --data fm14/data --max-train 5000 --max-eval 2000 --batch-size 256 2>&1 | grep -v "it/s\|%|" | tail -12
done
