"""Pretraining loop for IGPT (and the reusable pieces finetuning builds on): AdamW, warmup + cosine
schedule, gradient accumulation and clipping, bf16 autocast on GPU, activation checkpointing,
optional torch.compile, DDP under torchrun (gloo on CPU, nccl on GPU), atomic resumable checkpoints,
log.jsonl + console lines, validation loss, and a loss-curve PNG.

References: karpathy/nanoGPT train.py (loop shape, MFU estimate); the paper's recipe (Chen et al.
2020, section 3.5: Adam betas (0.9, 0.95), linear warmup then cosine decay to 0, no weight decay,
no dropout); docs/DESIGN.md (checkpoint and run-folder formats).

MFU = tokens/s * flops_per_token / peak_flops, flops_per_token = 6 N + 12 n_layer n_embd n_ctx
(N = parameters without the position table; PaLM appendix B / nanoGPT, attention counted as
non-causal), peak = the GPU's dense bf16 peak (table below or --peak-tflops). Not reported on CPU.

Reuse (finetuning): `train(model_config, tcfg, model=..., loss_fn=..., evaluate=..., on_eval=...)`
runs the same loop with another objective; `save_checkpoint`, `load_checkpoint`,
`model_from_checkpoint`, `configure_optimizer`, `make_scheduler`, `setup_distributed` stand alone.
A loss_fn gets the wrapped (DDP / compiled) model and must call it, not its methods, so DDP syncs
gradients: `model(idx, targets, labels=labels, classify=True)` reaches IGPT.classify.

Determinism: the data position is the number of micro-batches each rank consumed (data.train_loader
is deterministic in seed, rank and step); every rank's RNG state is saved, so N steps straight and
N/2 + resume + N/2 give bitwise-identical losses on CPU.
"""
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from igpt_fast.model import GPTConfig, IGPT

CKPT_NAME = "ckpt.pt"
CKPT_VERSION = 1
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


class DataMismatchError(ValueError):
    """Data (meta.json / palette) that does not fit the model or checkpoint."""


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite."""


@dataclass
class TrainConfig:
    data_dir: str
    out_dir: str
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr: float = 0.0
    warmup_steps: int = 100
    lr_decay_steps: int = 0  # cosine horizon; 0 means steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    log_every: int = 10
    eval_every: int = 200  # 0 disables intermediate evals (one still runs at the end)
    eval_batches: int = 20  # per process; 0 means the whole split
    ckpt_every: int = 500  # 0 means only at the end
    seed: int = 0
    compile: bool = False
    num_workers: int = 0
    peak_tflops: float = 0.0  # 0: look the GPU up in PEAK_BF16_TFLOPS


# ---- distributed setup


def setup_distributed():
    """(rank, world_size, local_rank, device). Under torchrun: init the process group (nccl on GPU,
    gloo on CPU); otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, local_rank, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ---- data / model compatibility


def check_data(meta, model_config, palette_sha256=None, data_dir="DATA_DIR"):
    """Raise DataMismatchError, naming the fix, when the data's meta.json does not fit the model
    (n_px, n_ctx, n_vocab) or a checkpoint's palette (palette_sha256)."""
    c = model_config
    if meta.get("version") != 1:
        raise DataMismatchError(f"{data_dir}/meta.json has version {meta.get('version')!r}; this igpt-fast reads "
                                "version 1: re-run `igpt-fast tokenize`")
    if meta["n_px"] != c.n_px or meta["n_ctx"] != c.n_ctx:
        raise DataMismatchError(f"the data in {data_dir} is {meta['n_px']}x{meta['n_px']} but the model is "
                                f"{c.n_px}x{c.n_px}: pass --n-px {meta['n_px']} (fresh runs) or re-tokenize with "
                                f"`igpt-fast tokenize --n-px {c.n_px}`")
    if meta["n_vocab"] != c.n_vocab:
        raise DataMismatchError(f"the data in {data_dir} has {meta['n_vocab']} colours but the model has n_vocab "
                                f"{c.n_vocab}: tokenize with the model's palette (or train a fresh model)")
    if palette_sha256 is not None and meta["palette_sha256"] != palette_sha256:
        raise DataMismatchError(f"the data in {data_dir} was tokenized with palette {meta['palette_sha256'][:12]} "
                                f"but the checkpoint uses {palette_sha256[:12]}: re-tokenize with the checkpoint's "
                                "palette (`igpt-fast tokenize --palette ...`)")


def load_data_palette(data_dir, meta):
    """The Palette in data_dir/palette.npy, checked against meta.json's sha256."""
    from igpt_fast.palette import Palette

    path = os.path.join(data_dir, "palette.npy")
    if not os.path.isfile(path):
        raise DataMismatchError(f"{path} not found; re-run `igpt-fast tokenize` into {data_dir}")
    palette = Palette.load(path)
    if palette.sha256 != meta["palette_sha256"]:
        raise DataMismatchError(f"{path} (sha256 {palette.sha256[:12]}) is not the palette meta.json names "
                                f"({meta['palette_sha256'][:12]}); re-run `igpt-fast tokenize` into {data_dir}")
    return palette


# ---- optimizer, schedule, checkpoints


def configure_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95)):
    """AdamW; weight decay (if any) on matrices only, never on norms, sos or positions' gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_factor(step, warmup_steps, decay_steps, min_ratio=0.0):
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup over warmup_steps,
    then cosine decay to min_ratio at decay_steps, flat after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup_steps, decay_steps, min_ratio=0.0):
    def factor(step):
        return lr_factor(step, warmup_steps, decay_steps, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_checkpoint(path, state):
    """torch.save to path.tmp, fsync, then rename: a crash never leaves a half-written path."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint dict (weights_only=True: tensors, numbers, strings and containers only)."""
    return torch.load(os.fspath(path), map_location=map_location, weights_only=True)


def model_from_checkpoint(ckpt):
    """Rebuild the IGPT a checkpoint (or converted HF file) describes, from its own config."""
    model = IGPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


def _rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def peak_flops(device, override_tflops=0.0):
    """Dense bf16 peak FLOP/s of a CUDA device (None on CPU or an unknown GPU without override)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def flops_per_token(model):
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.n_embd * c.n_ctx


# ---- the default (pretraining) objective and evaluation


def lm_loss(model, tokens, labels):
    """Pretraining objective (AR or BERT, as the model's config says): (loss, {})."""
    _, loss = model(tokens, tokens)
    return loss, {}


@torch.no_grad()
def evaluate_lm(model, data_dir, batch_size, max_batches, rank, world_size, device, autocast, seed):
    """Mean validation loss over the 'val' split (max_batches per process, 0 = all), averaged over
    processes; {} when there is no val split. BERT masks come from a fixed seed so every eval sees
    the same masks."""
    from igpt_fast.data import eval_loader, read_meta

    total = torch.zeros(2, dtype=torch.float64, device=device)
    shards = read_meta(data_dir)["splits"].get("val", {}).get("shards", 0)
    readers = min(shards, world_size)  # ranks beyond the shard count read nothing: still exactly once
    loader = eval_loader(data_dir, "val", batch_size, rank=rank, world_size=readers) if rank < readers else []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + 1_000_003 * (rank + 1))
        for i, (tokens, _) in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            tokens = tokens.to(device)
            with autocast:
                _, loss = model(tokens, tokens)
            total += torch.tensor([loss.item() * len(tokens), len(tokens)], dtype=torch.float64, device=device)
    _all_reduce_sum(total)
    return {"val_loss": (total[0] / total[1]).item()} if total[1] > 0 else {}


# ---- the loop


def _plot_losses(log_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(log_path)]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / pixel)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def train(model_config, tcfg, resume=None, model=None, loss_fn=lm_loss, evaluate=evaluate_lm, on_eval=None,
          print_fn=print):
    """Train; returns {"step", "loss", "val_loss", "ckpt"}. See the module docstring.

    resume: None (fresh), "auto" (out_dir/ckpt.pt when present) or a checkpoint path; a resumed run
    rebuilds its model from the checkpoint's config. model: an initial IGPT for fresh runs
    (e.g. pretrained + classifier for finetuning); default IGPT(model_config).
    on_eval(step, metrics, save) -> True stops training early (save(path) writes a checkpoint).
    """
    from igpt_fast.data import read_meta, train_loader

    rank, world_size, _, device = setup_distributed()
    master = rank == 0
    say = print_fn if master else (lambda *a, **k: None)

    meta = read_meta(tcfg.data_dir)
    palette = load_data_palette(tcfg.data_dir, meta)
    ckpt_path = os.path.join(tcfg.out_dir, CKPT_NAME)
    if resume == "auto":
        resume = ckpt_path if os.path.isfile(ckpt_path) else None
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        model_config = GPTConfig(**ckpt["model_config"])
    check_data(meta, model_config, ckpt["palette_sha256"] if ckpt else None, tcfg.data_dir)

    torch.manual_seed(tcfg.seed + rank)
    random.seed(tcfg.seed + rank)
    if ckpt is not None:
        model = IGPT(model_config)
        model.load_state_dict(ckpt["model"])
    elif model is None:
        model = IGPT(model_config)
    else:
        model_config = model.config
    raw_model = model.to(device)
    decay_steps = tcfg.lr_decay_steps or tcfg.steps
    optimizer = configure_optimizer(raw_model, tcfg.lr, tcfg.weight_decay)
    scheduler = make_scheduler(optimizer, tcfg.warmup_steps, decay_steps, tcfg.min_lr / tcfg.lr if tcfg.lr else 0.0)
    step, data_step, rng_state = 0, 0, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, data_step = ckpt["step"], ckpt["data_step"]
        if ckpt["world_size"] != world_size or ckpt["train_config"]["seed"] != tcfg.seed:
            say(f"warning: the checkpoint ran with world_size {ckpt['world_size']} and seed "
                f"{ckpt['train_config']['seed']}; the data order now differs from an uninterrupted run")
        rng_state = ckpt["rng"][rank] if len(ckpt["rng"]) == world_size else None
        del ckpt

    model = raw_model
    if tcfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    n_ctx = model_config.n_ctx
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * world_size * n_ctx
    fpt = flops_per_token(raw_model)
    peak = peak_flops(device, tcfg.peak_tflops)
    if master:
        os.makedirs(tcfg.out_dir, exist_ok=True)
        resolved = {"model": asdict(model_config), "train": asdict(tcfg), "world_size": world_size,
                    "device": str(device), "params": raw_model.num_params(), "flops_per_token": fpt,
                    "resumed_from": resume, "start_step": step, "palette_sha256": palette.sha256}
        with open(os.path.join(tcfg.out_dir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
        say(json.dumps(resolved, indent=2))
    log_path = os.path.join(tcfg.out_dir, "log.jsonl")

    def log(row):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def save(path=ckpt_path, extra=None):
        rngs = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if master:
            state = {"version": CKPT_VERSION, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "step": step, "data_step": data_step,
                     "samples_seen": data_step * tcfg.batch_size * world_size, "world_size": world_size,
                     "rng": rngs, "model_config": asdict(model_config), "train_config": asdict(tcfg),
                     "palette": torch.from_numpy(palette.centers.copy()), "palette_sha256": palette.sha256,
                     "extra": extra or {}}
            save_checkpoint(path, state)
        if world_size > 1:
            dist.barrier()

    def run_eval():
        """(metrics, stop): evaluate, log, and ask on_eval whether to stop."""
        raw_model.eval()  # not through DDP: ranks may see different numbers of eval batches
        metrics = evaluate(raw_model, tcfg.data_dir, tcfg.batch_size, tcfg.eval_batches, rank, world_size, device,
                           autocast, tcfg.seed)
        raw_model.train()
        if metrics:
            log({"step": step, **metrics})
            say(f"step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics, bool(on_eval(step, metrics, save)) if on_eval is not None else False

    batches = iter(train_loader(tcfg.data_dir, tcfg.batch_size, split="train", seed=tcfg.seed, rank=rank,
                                world_size=world_size, num_workers=tcfg.num_workers, start_step=data_step))
    if rng_state is not None:  # after iter(): creating a DataLoader iterator draws from torch's RNG
        _set_rng_state(rng_state)
    model.train()
    loss_value, val_metrics, stopped = float("nan"), {}, False
    t0, steps_timed = time.perf_counter(), 0
    while step < tcfg.steps:
        loss_sum = torch.zeros((), device=device)
        extra_metrics = {}
        for micro in range(tcfg.grad_accum):
            tokens, labels = next(batches)
            data_step += 1
            tokens, labels = tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            sync = nullcontext() if world_size == 1 or micro == tcfg.grad_accum - 1 else model.no_sync()
            with sync:
                with autocast:
                    loss, extra_metrics = loss_fn(model, tokens, labels)
                (loss / tcfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss_avg = _all_reduce_sum(loss_sum / (tcfg.grad_accum * world_size))
        loss_value = loss_avg.item()
        grad_norm = None
        if tcfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tcfg.grad_clip).item()
        if not math.isfinite(loss_value) or (grad_norm is not None and not math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            last = (f"the last good checkpoint is {ckpt_path}" if os.path.isfile(ckpt_path)
                    else "no checkpoint was written yet")
            raise TrainingDiverged(f"{what} is {loss_value if what == 'loss' else grad_norm} at step {step + 1}; "
                                   f"stopped before updating the weights ({last}). Lower --lr or raise "
                                   "--warmup-steps, then resume with --resume auto")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_timed += 1

        if step % tcfg.log_every == 0 or step == tcfg.steps:
            dt = (time.perf_counter() - t0) / steps_timed
            tok_s = tokens_per_step / dt
            row = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "ms_per_step": 1e3 * dt,
                   "tok_per_s": tok_s, **{k: float(v) for k, v in extra_metrics.items()}}
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            mfu = f"mfu {100 * tok_s * fpt / peak:.1f}%" if peak else "mfu -"
            if peak:
                row["mfu"] = tok_s * fpt / peak
            log(row)
            say(f"step {step} | loss {loss_value:.4f} | {1e3 * dt:.1f} ms/step | {tok_s:.3g} tok/s | {mfu}")
            t0, steps_timed = time.perf_counter(), 0
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
            val_metrics, stopped = run_eval()
            t0, steps_timed = time.perf_counter(), 0
        if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < tcfg.steps:
            save()
            t0, steps_timed = time.perf_counter(), 0
        if stopped:
            say(f"stopped early at step {step}")
            break

    if not stopped:
        val_metrics, _ = run_eval()
    save()
    if master and os.path.isfile(log_path):
        _plot_losses(log_path, os.path.join(tcfg.out_dir, "loss.png"))
    return {"step": step, "loss": loss_value, "val_loss": val_metrics.get("val_loss"), "ckpt": ckpt_path}
