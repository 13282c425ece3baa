"""Pretraining loop for IGPT, written flat like nanoGPT's train.py: plain functions over one `Run` state
object -- `start` (= `choose_checkpoint`, `build`, `restore`, `record`), `train_step`, `log_step`,
`save`, `evaluate_gen_loss` -- and `train`, the loop that calls them. Finetuning reuses the loop with its
own `Objective` (loss, evaluation, early stopping).

Three objects say what a run is: GPTConfig (the architecture, saved), TrainConfig (the recipe, saved
with every checkpoint) and RunOptions (how this process runs the model: kernels, activation
checkpointing, compile, DDP or FSDP; recorded in config.json, never saved in a checkpoint, so a run
made on a GPU with the Triton kernels resumes, probes and samples on a CPU).

Recipe (Chen et al. 2020, section 3.5; the optimizer and schedule shape in optim.py): AdamW betas
(0.9, 0.95), linear warmup then cosine decay, no weight decay, no dropout; gradient accumulation and
clipping, bf16 autocast on GPU, activation checkpointing, optional torch.compile, DDP or FSDP2 under
torchrun (gloo on CPU, nccl on GPU; see distributed.py, which also says what a resume on another number
of processes does to the data stream). The learning rate is a function of the step and the TrainConfig (`lr_at`), so a resumed run
continues its schedule from the saved step, with whatever schedule flags the resume changed. The
pretraining loss is L_GEN (`gen_loss`: AR next pixel or BERT masked pixels, as the config says).

Stopping early and on time (SIGTERM / Ctrl-C, `--max-minutes`): stop.py.

MFU = tokens/s * flops_per_token / peak_flops, flops_per_token = 6 N + 12 n_layer n_embd n_ctx
(N = parameters without the position table; PaLM appendix B / nanoGPT, attention counted as
non-causal), peak = the GPU's dense bf16 peak (table below or --peak-tflops). Not reported on CPU.

Run folder: config.json (the resolved configuration), log.jsonl (one JSON row per log or eval
step), ckpt.pt (latest) and ckpt.prev.pt (the one before), or ckpt.dcp/ and ckpt.prev.dcp/ with
fsdp, loss.png. Which checkpoint a run starts from and what a resume keeps: resume.py. Further rules:
- Divergence: a non-finite loss or gradient norm, or a loss above spike_factor x the median of the
  recent losses, stops the run before the weights are updated. If the latest checkpoint holds the
  weights that produced the blow-up (saved on the step before), the previous one (ckpt.prev.pt or
  ckpt.prev.dcp) takes its place, so the latest checkpoint is always the last good state.
- The checkpoint of a step is written before that step's evaluation, so a failing eval loses nothing.
- One writer: `train` (and finetuning, which runs it) holds the folder's lock (runlog.lock_run_folder)
  from before it looks at the folder to its end.

Data: meta.json is read once per command, by the caller or by `train` when none is given, and passed
down (meta=) to every loader and check.

Determinism: the data position is the number of micro-batches each rank consumed (data.train_loader
is deterministic in seed, rank and step); every rank's RNG state is saved, so N steps straight and
N/2 + resume + N/2 give bitwise-identical losses on CPU, with ddp and with fsdp.
"""
import json
import math
import os
import random
import signal
import statistics
import time
from collections import deque
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch
import torch.distributed as dist

from igpt_fast.checkpoint import (CKPT_NAME, DCP_NAME, check_resumable, checkpoint_step, is_sharded,
                                  latest_checkpoint, load_checkpoint, model_from_checkpoint, model_state,
                                  restore_previous, run_info, save_checkpoint, save_sharded_checkpoint)
from igpt_fast.distributed import all_reduce_sum, setup_distributed, shard_model
from igpt_fast.errors import RunStopped, TrainError, TrainingDiverged
from igpt_fast.model import IGPT, GPTConfig, autocast
from igpt_fast.optim import configure_optimizer, lr_factor
from igpt_fast.progress import line
from igpt_fast.resume import (ARCH_FIELDS, choose_checkpoint, merge_on_resume, restore, rng_state,
                              set_rng_state)
from igpt_fast.runlog import lock_run_folder, plot_losses, truncate_log, write_text_atomic
from igpt_fast.stop import UNBOUNDED_STEPS, StopOnSignal, TimeBudget

__all__ = ["TrainError", "TrainingDiverged", "RunStopped", "TrainConfig", "RunOptions", "Objective", "Run",
           "UNBOUNDED_STEPS", "configure_optimizer", "lr_at", "peak_flops", "flops_per_token", "start", "gen_loss",
           "train_step", "save", "evaluate_gen_loss", "train", "run_device", "tensorboard_writer_class"]

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
PARALLEL = ("ddp", "fsdp")


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
    num_workers: int = 0
    peak_tflops: float = 0.0  # 0: look the GPU up in PEAK_BF16_TFLOPS
    spike_factor: float = 4.0  # a loss above this x the recent median is a blow-up; 0 disables
    on_bad_shard: str = "error"  # "skip": a bad train shard is left out, warned of and counted (data.py)
    max_minutes: float = 0.0  # wall-clock budget of this process (stop.TimeBudget); steps is then an upper bound

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise TrainError(f"{f.name} must be a finite number, got {v}")


@dataclass(frozen=True)
class RunOptions:
    """How this process runs the model: chosen per run, recorded in config.json, never saved in a checkpoint."""

    impl: str = "auto"  # kernels: auto (Triton on CUDA, torch elsewhere), triton, torch (model.IGPT)
    grad_checkpoint: bool = False  # activation checkpointing: blocks recomputed in backward
    compile: bool = False  # torch.compile the module the loss calls
    parallel: str = "ddp"  # under torchrun: "ddp" (DDP when world_size > 1) or "fsdp" (fully_shard, sharded ckpts)
    mixed_precision: bool | None = None  # fsdp: bf16 parameters, fp32 gradient reduction; None: on with CUDA
    device: str | None = None  # "cpu", "cuda:1", ...; None: the process's own (setup_distributed), see run_device
    tensorboard: bool = False  # the main process also writes log.jsonl's scalars as TensorBoard events to RUN/tb/

    def __post_init__(self):
        if self.parallel not in PARALLEL:
            raise TrainError(f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if self.mixed_precision and self.parallel != "fsdp":
            raise TrainError("mixed_precision is FSDP's parameter dtype: use it with parallel='fsdp' (DDP runs use "
                             "bf16 autocast on CUDA)")


def gen_loss(module, tokens, labels):
    """L_GEN, the pretraining objective (AR or BERT, as the model's config says): (loss, {})."""
    _, loss = module(tokens, tokens)
    return loss, {}


@dataclass(frozen=True)
class Objective:
    """What the loop optimises and measures. loss(module, tokens, labels) -> (loss, metrics) gets the wrapped
    module (so DDP syncs); evaluate(run) -> metrics; on_eval(run, metrics) -> True stops the run early;
    classifier: the module the loss calls is a model.Classifier around the model (finetuning); sections: more
    top-level sections of RUN/config.json, written with the rest when the run starts (finetune's settings)."""

    loss: Callable[..., tuple[torch.Tensor, dict]] = gen_loss
    evaluate: Callable[["Run"], dict] | None = None  # None: evaluate_gen_loss
    on_eval: Callable[["Run", dict], object] | None = None
    classifier: bool = False
    sections: dict[str, Any] | None = None


@dataclass
class Run:
    """The state of one training run: what the loop reads and updates."""

    tcfg: TrainConfig
    options: RunOptions
    model: IGPT  # unwrapped (with FSDP: the sharded model itself): saved, evaluated
    module: torch.nn.Module  # what the loss calls: DDP / compiled wrapper of the model (or a Classifier)
    optimizer: torch.optim.Optimizer
    palette: object
    meta: dict
    rank: int
    world_size: int
    device: torch.device
    autocast: object
    step: int = 0
    data_step: int = 0
    samples_seen: int = 0  # over all ranks, across resumes at other world sizes
    saved_step: int = -1  # step of RUN/ckpt.pt (ckpt.dcp with fsdp), -1 when none
    losses: deque = field(default_factory=lambda: deque(maxlen=50))  # recent step losses (blow-up test)
    rng_state: object = None  # this rank's RNG state from the checkpoint, set once the data loader exists
    print_fn: Callable[..., object] = print
    signal_received: int = 0  # SIGTERM or SIGINT as this process got it (stop.StopOnSignal), 0 before
    stop_signal: int = 0  # the signal every rank agreed to stop on after the current step (train_step), 0 if none
    tb: Any = None  # the main process's TensorBoard SummaryWriter (options.tensorboard), else None

    @property
    def master(self):
        return self.rank == 0

    @property
    def parallel(self):
        return self.options.parallel

    @property
    def ckpt_path(self):
        return os.path.join(self.tcfg.out_dir, DCP_NAME if self.parallel == "fsdp" else CKPT_NAME)

    @property
    def log_path(self):
        return os.path.join(self.tcfg.out_dir, "log.jsonl")

    def say(self, msg):
        if self.master:
            self.print_fn(msg)

    def log(self, row):
        """Append one row to RUN/log.jsonl (main process), and its numbers to RUN/tb/ with tensorboard."""
        if self.master:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.tb.add_scalar(key, value, row["step"])


def lr_at(tcfg, step):
    """The learning rate of optimizer step `step` under tcfg's warmup + cosine schedule."""
    min_ratio = tcfg.min_lr / tcfg.lr if tcfg.lr else 0.0
    return tcfg.lr * lr_factor(step, tcfg.warmup_steps, tcfg.lr_decay_steps or tcfg.steps, min_ratio)


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


def run_device(options, device):
    """The device a run uses: options.device, else `device` (setup_distributed's: cuda:LOCAL_RANK or cpu). In a
    process group (torchrun, fsdp) the backend was chosen for the default kind of device, so only that kind
    runs there (its index is the local rank's)."""
    if options.device is None:
        return device
    asked = torch.device(options.device)
    if dist.is_initialized():
        if asked.type != device.type or (asked.index is not None and asked != device):
            raise TrainError(f"device {asked}: under torchrun or with fsdp every process runs on its own {device} "
                             f"(the process group's backend is chosen for it); leave out --device, or hide the GPUs "
                             "(CUDA_VISIBLE_DEVICES=) to train on CPU")
        return device
    return asked


def tensorboard_writer_class():
    """torch.utils.tensorboard's SummaryWriter, or a TrainError naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("TensorBoard logging (--tensorboard) needs the tensorboard package: pip install "
                         "tensorboard") from None
    return SummaryWriter


def build(model_config, tcfg, options, ckpt=None, model=None, classifier=False, meta=None, print_fn=print):
    """A Run at step 0 on this process's device: the model (from a single-file checkpoint's weights, the
    given initial model, or fresh; a sharded checkpoint's weights come in `restore`), sharded with fsdp,
    its optimizer, and the module the loss calls (Classifier, torch.compile, DDP wrappers)."""
    from igpt_fast.data import load_data_palette
    from igpt_fast.model import Classifier

    fsdp = options.parallel == "fsdp"
    rank, world_size, _, device = setup_distributed(group_of_one=fsdp)
    device = run_device(options, device)
    torch.manual_seed(tcfg.seed + rank)
    random.seed(tcfg.seed + rank)
    if ckpt is not None and not is_sharded(ckpt["path"]):
        model = model_from_checkpoint(ckpt, impl=options.impl, grad_checkpoint=options.grad_checkpoint)
    elif ckpt is not None or model is None:
        model = IGPT(model_config, impl=options.impl, grad_checkpoint=options.grad_checkpoint)
    model.to(device)
    if fsdp:
        options = RunOptions(**{**asdict(options), "mixed_precision": (device.type == "cuda"
                             if options.mixed_precision is None else options.mixed_precision)})
        shard_model(model, options.mixed_precision)
    optimizer = configure_optimizer(model, tcfg.lr, tcfg.weight_decay)
    module = Classifier(model) if classifier else model
    if options.compile:
        module = torch.compile(module)
    if world_size > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(tcfg, options, model, module, optimizer, load_data_palette(tcfg.data_dir, meta), meta, rank,
               world_size, device, autocast(device), print_fn=print_fn)


def record(run, resumed_from=None, changed=(), sections=None):
    """Main process: RUN made, log.jsonl cut back to a resumed step, the resolved configuration (plus the
    caller's `sections`) written to RUN/config.json and printed, with the changes a resume made and a warning
    for a warmup as long as the run."""
    if not run.master:
        return
    tcfg = run.tcfg
    os.makedirs(tcfg.out_dir, exist_ok=True)
    if resumed_from is not None:
        truncate_log(run.log_path, run.step)
    resolved = {"model": asdict(run.model.config), "train": asdict(tcfg), "world_size": run.world_size,
                **asdict(run.options), "device": str(run.device),
                "mixed_precision": bool(run.options.mixed_precision), "params": run.model.num_params(),
                "flops_per_token": flops_per_token(run.model), "resumed_from": resumed_from, "start_step": run.step,
                "changed_on_resume": list(changed), "palette_sha256": run.palette.sha256, **(sections or {})}
    if changed:
        run.say("changed on resume: " + ", ".join(changed))
    write_text_atomic(os.path.join(tcfg.out_dir, "config.json"), json.dumps(resolved, indent=2))
    run.say(json.dumps(resolved, indent=2))
    if tcfg.warmup_steps >= tcfg.steps:
        run.say(f"warning: warmup_steps {tcfg.warmup_steps} >= steps {tcfg.steps}: the learning rate only ramps up "
                f"to {lr_at(tcfg, tcfg.steps - 1):.3g} (peak --lr {tcfg.lr:.3g}) and never decays; lower "
                "--warmup-steps")


def start(model_config, tcfg, options=None, resume=None, overwrite=False, explicit=None, model=None, meta=None,
          classifier=False, print_fn=print, sections=None):
    """Set up a run (see the module docstring for the folder rules) and return its Run.

    options: RunOptions (default RunOptions()). resume: None (fresh), "auto" (the newest complete
    checkpoint; a fresh run when RUN holds no run file) or a checkpoint path (file or DCP folder).
    explicit: the names of the GPTConfig and TrainConfig fields the caller set on purpose (None: all of
    them). model: an initial IGPT for fresh runs (default IGPT(model_config)). meta: the data's meta.json
    (read when None). classifier: the loss calls a model.Classifier around the model (finetuning, DDP only).
    sections: more sections of RUN/config.json (record).
    """
    from igpt_fast.data import check_data, read_meta

    options = options or RunOptions()
    if options.parallel == "fsdp" and classifier:
        raise TrainError("finetuning runs with DDP (its Classifier calls the model's parts, which FSDP does not "
                         "gather); train with --parallel fsdp, then finetune the run")
    explicit = set(ARCH_FIELDS + tuple(f.name for f in fields(TrainConfig))) if explicit is None else set(explicit)
    rank, world_size, _, _ = setup_distributed(group_of_one=options.parallel == "fsdp")
    say = print_fn if rank == 0 else (lambda *a, **k: None)
    meta = meta if meta is not None else read_meta(tcfg.data_dir)
    resume = choose_checkpoint(tcfg.out_dir, resume, overwrite, rank, world_size, say)
    ckpt, changed = None, []
    if resume is not None:
        ckpt = load_checkpoint(resume, weights=False)
        check_resumable(ckpt)
        model_config, tcfg, changed = merge_on_resume(ckpt, model_config, tcfg, explicit)
    check_data(meta, model_config, ckpt["palette_sha256"] if ckpt else None, tcfg.data_dir)
    run = build(model_config, tcfg, options, ckpt, model, classifier, meta, print_fn)
    if ckpt is not None:
        restore(run, ckpt)
        del ckpt
    record(run, resume, changed, sections)
    return run


def _check_divergence(run, loss, grad_norm):
    """Raise TrainingDiverged (after restoring the last good checkpoint) on a blow-up."""
    tcfg = run.tcfg
    reason = None
    if not math.isfinite(loss):
        reason = f"loss is {loss}"
    elif grad_norm is not None and not math.isfinite(grad_norm):
        reason = f"gradient norm is {grad_norm}"
    elif tcfg.spike_factor and run.losses and loss > tcfg.spike_factor * statistics.median(run.losses):
        reason = (f"loss {loss:.4g} is above {tcfg.spike_factor:g} x the median of the last {len(run.losses)} "
                  f"steps ({statistics.median(run.losses):.4g})")
    if reason is None:
        run.losses.append(loss)
        return
    last = "no checkpoint was written yet"
    if run.master and run.saved_step >= 0:
        if run.saved_step == run.step:
            # the latest checkpoint holds the weights that produced this loss: the one before (ckpt.prev.pt or
            # ckpt.prev.dcp) is the last good state
            restored = restore_previous(run.tcfg.out_dir)
            last = (f"{restored} (step {checkpoint_step(restored)}, restored from the previous checkpoint)"
                    if restored else "no good checkpoint (the only one held these weights and was removed)")
        else:
            last = f"{latest_checkpoint(run.tcfg.out_dir) or run.ckpt_path} (step {run.saved_step})"
    raise TrainingDiverged(f"{reason} at step {run.step + 1}; stopped before updating the weights. The last good "
                           f"checkpoint is {last}. Lower --lr or raise --warmup-steps, then resume with "
                           "--resume auto")


def train_step(run, batches, loss_fn=gen_loss):
    """One optimizer step over grad_accum micro-batches: (loss, grad norm or None, extra metrics)."""
    tcfg = run.tcfg
    loss_sum = torch.zeros((), device=run.device)
    extra = {}
    fsdp = run.parallel == "fsdp"
    for micro in range(tcfg.grad_accum):
        tokens, labels = next(batches)
        run.data_step += 1
        run.samples_seen += len(tokens) * run.world_size
        tokens = tokens.to(run.device, non_blocking=True)
        labels = labels.to(run.device, non_blocking=True)
        last = micro == tcfg.grad_accum - 1
        if fsdp:  # FSDP2's no_sync: gradients accumulate unsharded, reduce-scattered on the last micro-batch
            run.model.set_requires_gradient_sync(last)
        with nullcontext() if run.world_size == 1 or last or fsdp else run.module.no_sync():
            with run.autocast:
                loss, extra = loss_fn(run.module, tokens, labels)
            (loss / tcfg.grad_accum).backward()
        loss_sum += loss.detach().float()
    # the ranks' stop flags ride on the loss all-reduce: every rank learns of a signal any rank got, after this step
    flags = torch.tensor([run.signal_received == signal.SIGTERM, run.signal_received == signal.SIGINT],
                         dtype=loss_sum.dtype, device=run.device)
    reduced = all_reduce_sum(torch.cat([(loss_sum / (tcfg.grad_accum * run.world_size)).view(1), flags]))
    loss_value, term, interrupt = reduced.tolist()
    run.stop_signal = signal.SIGTERM if term else signal.SIGINT if interrupt else 0
    grad_norm = None
    if tcfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), tcfg.grad_clip)
        grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # a DTensor with FSDP
    _check_divergence(run, loss_value, grad_norm)
    lr = lr_at(tcfg, run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss_value, grad_norm, {k: float(v) for k, v in extra.items()}


def _step_label(run):
    """'step 5/100', or 'step 5' while --max-minutes has not fixed the steps yet (an upper bound only)."""
    return f"step {run.step}" + ("" if run.tcfg.max_minutes > 0 else f"/{run.tcfg.steps}")


def log_step(run, loss, grad_norm, extra, seconds_per_step):
    tokens_per_step = run.tcfg.batch_size * run.tcfg.grad_accum * run.world_size * run.model.config.n_ctx
    tok_s = tokens_per_step / seconds_per_step
    peak = peak_flops(run.device, run.tcfg.peak_tflops)
    row = {"step": run.step, "loss": loss, "lr": float(f"{lr_at(run.tcfg, run.step - 1):.6g}"),
           "ms_per_step": 1e3 * seconds_per_step, "tok_per_s": tok_s, **extra}
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    if peak:
        row["mfu"] = tok_s * flops_per_token(run.model) / peak
    run.log(row)
    eta = None if run.tcfg.max_minutes > 0 else (run.tcfg.steps - run.step) * seconds_per_step
    run.say(line(_step_label(run), loss=loss, **extra, lr=row["lr"], ms_per_step=row["ms_per_step"], tok_per_s=tok_s,
                 mfu=row.get("mfu"), eta=eta))


def save(run, path=None, extra=None):
    """Write the training state (every rank's RNG state). path None: RUN/ckpt.pt, the previous one kept as
    ckpt.prev.pt (the main process writes); with FSDP RUN/ckpt.dcp and ckpt.prev.dcp, each rank writing
    its shards (collective)."""
    rngs = [None] * run.world_size
    if run.world_size > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    training = dict(data_step=run.data_step, samples_seen=run.samples_seen, world_size=run.world_size, rng=rngs,
                    train_config=asdict(run.tcfg), recent_losses=list(run.losses), extra=extra or {},
                    parallel=run.parallel)
    if run.parallel == "fsdp":
        info = run_info(run.model.config, run.palette, step=run.step, **training)
        save_sharded_checkpoint(path or run.ckpt_path, run.model, run.optimizer, info, keep_previous=path is None)
    elif run.master:
        state = model_state(run.model, run.palette, step=run.step, optimizer=run.optimizer.state_dict(), **training)
        save_checkpoint(path or run.ckpt_path, state, keep_previous=path is None)
    if path is None:
        run.saved_step = run.step
    if run.world_size > 1:
        dist.barrier()


@torch.no_grad()
def evaluate_gen_loss(run):
    """Mean L_GEN over the 'val' split (eval_batches per process, 0 = all), averaged over processes, as
    {"val_loss"}; {} when there is no val split. BERT masks come from a fixed seed so every eval sees
    the same masks. Runs on the unwrapped model; ranks may see different numbers of batches, so with
    FSDP (whose every forward gathers parameters from all ranks) the ranks go in lockstep: each batch
    starts with an all-reduce of "still have one", and a rank that ran out forwards a dummy batch,
    uncounted, until every rank is done."""
    from igpt_fast.data import eval_loader

    if "val" not in run.meta["splits"]:
        return {}
    total = torch.zeros(2, dtype=torch.float64, device=run.device)
    loader = eval_loader(run.tcfg.data_dir, "val", run.tcfg.batch_size, rank=run.rank, world_size=run.world_size,
                         meta=run.meta)
    lockstep = run.parallel == "fsdp" and run.world_size > 1
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(run.tcfg.seed + 1_000_003 * (run.rank + 1))
        batches = iter(loader)  # inside the fork: creating a DataLoader iterator draws from torch's RNG
        i = 0
        while True:
            batch = next(batches, None) if not run.tcfg.eval_batches or i < run.tcfg.eval_batches else None
            if lockstep:
                more = torch.tensor([int(batch is not None)], device=run.device)
                dist.all_reduce(more, op=dist.ReduceOp.MAX)
                if not more.item():
                    break
            elif batch is None:
                break
            tokens = (batch[0] if batch is not None else torch.zeros(1, run.model.config.n_ctx, dtype=torch.long))
            tokens = tokens.to(run.device)
            with run.autocast:
                _, loss = run.model(tokens, tokens)
            if batch is not None:
                total += torch.tensor([loss.item() * len(tokens), len(tokens)], dtype=torch.float64,
                                      device=run.device)
            i += 1
    all_reduce_sum(total)
    return {"val_loss": (total[0] / total[1]).item()} if total[1] > 0 else {}


def _evaluate_and_log(run, evaluate):
    run.model.eval()
    metrics = evaluate(run)
    run.model.train()
    if metrics:
        run.log({"step": run.step, **metrics})
        run.say(line(_step_label(run), **metrics))
    return metrics


def _plot(run):
    if run.master and os.path.isfile(run.log_path):
        plot_losses(run.log_path, os.path.join(run.tcfg.out_dir, "loss.png"))


def _pause(run, evaluate):
    """Save, evaluate and plot once, for the time budget's plan: the seconds of each."""
    seconds = []
    for action in (lambda: save(run), lambda: _evaluate_and_log(run, evaluate), lambda: _plot(run)):
        t = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - t)
    return tuple(seconds)


def train(model_config: GPTConfig, tcfg: TrainConfig, options: RunOptions | None = None, resume: str | None = None,
          overwrite: bool = False, explicit: Iterable[str] | None = None, model: IGPT | None = None,
          meta: dict | None = None, objective: Objective | None = None,
          print_fn: Callable[..., object] = print) -> dict[str, Any]:
    """Train; returns {"step", "loss", "val_loss", "ckpt", "skipped_shards"}. Setup arguments as `start`;
    objective: an Objective (default: pretraining, L_GEN). Holds the run folder's lock throughout; raises
    RunStopped after saving when SIGTERM or SIGINT stopped it."""
    started = time.perf_counter()  # the clock of max_minutes
    options, objective = options or RunOptions(), objective or Objective()
    writer = tensorboard_writer_class() if options.tensorboard else None
    rank, world_size, _, _ = setup_distributed(group_of_one=options.parallel == "fsdp")
    lock = lock_run_folder(tcfg.out_dir, rank, world_size, print_fn)
    run = None
    try:
        run = start(model_config, tcfg, options, resume, overwrite, explicit, model, meta, objective.classifier,
                    print_fn, objective.sections)
        if writer is not None and run.master:  # a resumed run's events past its step are hidden (purge_step)
            run.tb = writer(os.path.join(tcfg.out_dir, "tb"), purge_step=run.step or None, flush_secs=10)
        return _loop(run, objective, started)
    finally:
        if run is not None and run.tb is not None:
            run.tb.close()
        if lock is not None:
            lock.release()


def _loop(run, objective, started):
    """train's loop over a Run set up by `start`."""
    from igpt_fast.data import train_loader

    tcfg = run.tcfg
    evaluate, on_eval = objective.evaluate or evaluate_gen_loss, objective.on_eval
    loader = train_loader(tcfg.data_dir, tcfg.batch_size, split="train", seed=tcfg.seed, rank=run.rank,
                          world_size=run.world_size, num_workers=tcfg.num_workers, start_step=run.data_step,
                          meta=run.meta, on_bad_shard=tcfg.on_bad_shard)
    batches = iter(loader)
    if run.rng_state is not None:  # after iter(): creating a DataLoader iterator draws from torch's RNG
        set_rng_state(run.rng_state)
    run.module.train()
    loss, metrics, stopped = float("nan"), {}, False
    t0, timed = time.perf_counter(), 0
    budget = TimeBudget(tcfg.max_minutes, started) if tcfg.max_minutes else None
    with StopOnSignal(run):
        while run.step < tcfg.steps and not stopped:
            t_step = time.perf_counter()
            loss, grad_norm, extra = train_step(run, batches, objective.loss)
            if budget is not None and budget.after_step(run, time.perf_counter() - t_step,
                                                        lambda: _pause(run, evaluate)):
                t0, timed = time.perf_counter(), 0
            if tcfg.on_bad_shard == "skip":
                extra["skipped_shards"] = loader.skipped_shards  # this process's bad shards so far
            timed += 1
            if run.step % tcfg.log_every == 0 or run.step == tcfg.steps or run.stop_signal:
                log_step(run, loss, grad_norm, extra, (time.perf_counter() - t0) / timed)
                t0, timed = time.perf_counter(), 0
            if run.step == tcfg.steps or run.stop_signal:
                break
            if tcfg.ckpt_every and run.step % tcfg.ckpt_every == 0:
                save(run)
                t0, timed = time.perf_counter(), 0
            if tcfg.eval_every and run.step % tcfg.eval_every == 0:
                metrics = _evaluate_and_log(run, evaluate)
                stopped = bool(on_eval(run, metrics)) if on_eval is not None else False
                if stopped:
                    run.say(f"stopped early at step {run.step}")
                t0, timed = time.perf_counter(), 0
        if run.saved_step != run.step:
            save(run)
    if run.stop_signal:
        if run.world_size > 1:
            dist.barrier()
        name = signal.Signals(run.stop_signal).name
        raise RunStopped(f"stopped by {name} after step {run.step}: checkpoint {run.ckpt_path} (step {run.step}); "
                         "continue with --resume auto", run.stop_signal)
    if not stopped:
        metrics = _evaluate_and_log(run, evaluate)
        if on_eval is not None:
            on_eval(run, metrics)
    _plot(run)
    if run.world_size > 1:
        dist.barrier()  # every rank done before any tears its process group down (gloo aborts otherwise)
    return {"step": run.step, "loss": loss, "val_loss": metrics.get("val_loss"), "ckpt": run.ckpt_path,
            "skipped_shards": loader.skipped_shards}
