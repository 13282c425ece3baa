#!/usr/bin/env bash
# CPU proxy: LR and size at 14 px, 16 greys; AR, 150 steps of batch 32 (4,800 images), val loss on 10 batches
export OMP_NUM_THREADS=1
IG=igpt-fast
for spec in "4 64 2 1e-3" "4 64 2 3e-3" "4 64 2 1e-2" "4 128 4 3e-3"; do
  set -- $spec
  out=runs/L$1_E$2_lr$4
  /usr/bin/time -f "%e s wall" $IG train fm14/data --out $out --overwrite --n-layer $1 --n-embd $2 --n-head $3 --objective ar \
    --steps 150 --batch-size 32 --lr $4 --warmup-steps 15 --log-every 50 --eval-every 0 --eval-batches 10 --ckpt-every 0 \
    2>&1 | grep -E "^step 150|^done|wall" | sed "s|^|$out: |"
done
