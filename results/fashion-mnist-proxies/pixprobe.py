"""CPU proxy: the raw-pixel linear probe the features must beat, by train-set size.

    python pixprobe.py fm14/data 5000 54000   # writes fm14/data_pixprobe.json
"""
import json, sys, time
import numpy as np, torch
from igpt_fast.data import eval_loader, read_meta, load_data_palette
from igpt_fast.probe import pixel_features, sweep

data = sys.argv[1]
meta = read_meta(data); pal = load_data_palette(data, meta); n_px = meta["n_px"]
def split(name):
    toks, ys = [], []
    for t, y in eval_loader(data, name, 1000, meta=meta):
        toks.append(t); ys.append(y)
    return torch.cat(toks).numpy(), torch.cat(ys)
tr, va, te = split("train"), split("val"), split("test")
out = {}
for n in [int(a) for a in sys.argv[2:]]:
    t0 = time.perf_counter()
    f = lambda s, k=None: (pixel_features(s[0][:k], pal, n_px), s[1][:k])
    row = sweep(f(tr, n), f(va), f(te), n_classes=10)[0]
    out[n] = {k: row[k] for k in ("l2", "train_acc", "val_acc", "test_acc")} | {"seconds": round(time.perf_counter() - t0, 1)}
    print(n_px, n, out[n], flush=True)
json.dump(out, open(sys.argv[1].rstrip("/") + f"_pixprobe.json", "w"), indent=1)
