"""Pretraining loop for IGPT, written flat like nanoGPT's train.py: `start` (setup and resume),
`train_step`, `log_step`, `save`, `evaluate_lm`, all plain functions over one `Run` state object,
and `train`, the loop that calls them. Finetuning reuses the loop with its own loss and evaluation.

Recipe (Chen et al. 2020, section 3.5): AdamW betas (0.9, 0.95), linear warmup then cosine decay,
no weight decay, no dropout; gradient accumulation and clipping, bf16 autocast on GPU, activation
checkpointing, optional torch.compile, DDP or FSDP2 under torchrun (gloo on CPU, nccl on GPU). The learning
rate is a function of the step and the TrainConfig (`lr_at`), so a resumed run continues its
schedule from the saved step, with whatever schedule flags the resume changed.

Time budget (max_minutes, `--max-minutes`): the step count, and with it the cosine, is fitted to a
wall-clock budget once, at the end of warmup (`TimeBudget`); from then on the run is an ordinary
N-step run whose checkpoints record N, so it resumes like any other.

MFU = tokens/s * flops_per_token / peak_flops, flops_per_token = 6 N + 12 n_layer n_embd n_ctx
(N = parameters without the position table; PaLM appendix B / nanoGPT, attention counted as
non-causal), peak = the GPU's dense bf16 peak (table below or --peak-tflops). Not reported on CPU.

Parallelism (`parallel`: "ddp" or "fsdp", chosen per run like impl; see distributed.py, which also
says what a resume on another number of processes does to the data stream).

Run folder: config.json (the resolved configuration), log.jsonl (one JSON row per log or eval
step), ckpt.pt (latest) and ckpt.prev.pt (the one before), or ckpt.dcp/ and ckpt.prev.dcp/ with
fsdp, loss.png. Rules:
- a folder that holds a run (config.json, log.jsonl or any ckpt* entry) is continued only with
  resume="auto" (or a path) and restarted only with overwrite=True; anything else is refused, and so
  is resume="auto" when none of its checkpoints is complete. resume="auto" takes the newest complete
  checkpoint, wherever a kill left it (checkpoint.recover_checkpoint); a weights-only file (export,
  convert) is refused.
- Resume: the checkpoint's architecture wins; an architecture field the caller set explicitly and
  that differs is an error naming each field. Training fields set explicitly (lr, steps, batch
  size, ...; TRAIN_OVERRIDES) override the checkpoint's and are printed as "changed on resume".
  Rows of log.jsonl past the checkpoint's step are dropped (atomic rewrite).
- Divergence: a non-finite loss or gradient norm, or a loss above spike_factor x the median of the
  recent losses, stops the run before the weights are updated. If the latest checkpoint holds the
  weights that produced the blow-up (saved on the step before), the previous one (ckpt.prev.pt or
  ckpt.prev.dcp) takes its place, so the latest checkpoint is always the last good state.
- The checkpoint of a step is written before that step's evaluation, so a failing eval loses nothing.
- One writer: `train` (and finetuning, which runs it) holds the folder's lock (runlog.RunLock on
  RUN/.lock; rank 0 under torchrun) from before it looks at the folder to its end; a second run into
  a held folder fails on every rank with RunInUse naming the holder. A lock a killed run left is taken
  over with a note.
- Stopping: SIGTERM (preemption, torchrun's shutdown, a launcher that died: distributed.py) or SIGINT
  (Ctrl-C) while the loop runs lets the current step finish, logs it, writes its checkpoint and raises
  RunStopped (the CLI prints its one line, naming the checkpoint, and exits 128 + signal: 143, 130);
  `--resume auto` continues from that step. A second Ctrl-C aborts at once, without saving. Under
  torchrun the ranks agree on the step to stop after: each rank's signal flags ride on the step's loss
  all-reduce (no extra collective), so every rank saves the same step (the FSDP save is collective)
  and exits with the same code. torchrun gives its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s by
  default) between its SIGTERM and a SIGKILL: a step plus a save must fit in it. Before the loop and
  after its last checkpoint the signals keep their usual effect (nothing is lost there).

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
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist

from igpt_fast.checkpoint import (CKPT_NAME, DCP_NAME, checkpoint_step, is_sharded, latest_checkpoint,
                                  load_checkpoint, load_full_optimizer_state, load_sharded_state, model_from_checkpoint,
                                  model_state, recover_checkpoint, remove_checkpoints, resolve_checkpoint,
                                  restore_previous, run_files, run_info, save_checkpoint, save_sharded_checkpoint,
                                  check_resumable)
from igpt_fast.distributed import all_reduce_sum, setup_distributed, shard_model
from igpt_fast.errors import IGPTError
from igpt_fast.model import GPTConfig, IGPT
from igpt_fast.progress import line
from igpt_fast.runlog import RunLock, plot_losses, truncate_log, write_text_atomic

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
PARALLEL = ("ddp", "fsdp")
# TimeBudget: steps left out of the timing (compile, autotune), steps timed before a plan, share of the
# budget after which the plan happens even inside warmup, spare time in the plan, steps in the running mean
TIME_SKIP, TIME_MIN_TIMED, TIME_PLAN_FRACTION, TIME_MARGIN, TIME_WINDOW = 2, 5, 0.1, 0.97, 20
UNBOUNDED_STEPS = 10**9  # --steps when --max-minutes alone bounds a run
# Training fields a resume may change (given explicitly); the rest (seed, paths) stay the checkpoint's.
TRAIN_OVERRIDES = ("steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "lr_decay_steps",
                   "weight_decay", "grad_clip", "log_every", "eval_every", "eval_batches", "ckpt_every",
                   "num_workers", "peak_tflops", "spike_factor", "on_bad_shard", "max_minutes")
ARCH_FIELDS = tuple(f.name for f in fields(GPTConfig))


class TrainError(IGPTError, ValueError):
    """A training request that cannot run as given (run folder in use, conflicting resume flags)."""


class TrainingDiverged(IGPTError, RuntimeError):
    """The loss (or gradient norm) became non-finite or blew up."""


class RunStopped(IGPTError):
    """The run stopped on SIGTERM or SIGINT after saving its last step; exit_code is 128 + the signal."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


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
    max_minutes: float = 0.0  # wall-clock budget of this process (TimeBudget); steps is then an upper bound

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise TrainError(f"{f.name} must be a finite number, got {v}")


@dataclass
class Run:
    """The state of one training run: what the loop reads and updates."""

    tcfg: TrainConfig
    model: IGPT  # unwrapped (with FSDP: the sharded model itself): saved, evaluated
    module: torch.nn.Module  # what the loss calls: DDP / compiled wrapper of the model (or a Classifier)
    optimizer: torch.optim.Optimizer
    palette: object
    meta: dict
    rank: int
    world_size: int
    device: torch.device
    autocast: object
    parallel: str = "ddp"  # "ddp" (DDP when world_size > 1) or "fsdp" (fully_shard, sharded checkpoints)
    step: int = 0
    data_step: int = 0
    samples_seen: int = 0  # over all ranks, across resumes at other world sizes
    saved_step: int = -1  # step of RUN/ckpt.pt (ckpt.dcp with fsdp), -1 when none
    losses: deque = field(default_factory=lambda: deque(maxlen=50))  # recent step losses (blow-up test)
    rng_state: object = None  # this rank's RNG state from the checkpoint, set once the data loader exists
    print_fn: object = print
    signal_received: int = 0  # SIGTERM or SIGINT as this process got it (_StopOnSignal), 0 before
    stop_signal: int = 0  # the signal every rank agreed to stop on after the current step (train_step), 0 if none

    @property
    def master(self):
        return self.rank == 0

    @property
    def ckpt_path(self):
        return os.path.join(self.tcfg.out_dir, DCP_NAME if self.parallel == "fsdp" else CKPT_NAME)

    @property
    def log_path(self):
        return os.path.join(self.tcfg.out_dir, "log.jsonl")

    def say(self, msg):
        if self.master:
            self.print_fn(msg)


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


def lr_at(tcfg, step):
    """The learning rate of optimizer step `step` under tcfg's warmup + cosine schedule."""
    min_ratio = tcfg.min_lr / tcfg.lr if tcfg.lr else 0.0
    return tcfg.lr * lr_factor(step, tcfg.warmup_steps, tcfg.lr_decay_steps or tcfg.steps, min_ratio)


def _rank0(run, value):
    """An int as rank 0 has it, on every rank (a broadcast under torchrun)."""
    if run.world_size == 1:
        return value
    agreed = torch.tensor([value], dtype=torch.int64, device=run.device)
    dist.broadcast(agreed, src=0)
    return int(agreed.item())


class TimeBudget:
    """max_minutes: end a run on time with its cosine schedule completed, by fitting the step count to the
    budget once, at the end of warmup.

    The clock starts when `train` is called (setup, data loader start and a resume's load count). The steps
    of this process are timed (the first TIME_SKIP, which compile and autotune, left out). At the end of
    warmup, or once TIME_PLAN_FRACTION of the budget is spent if that comes first (never before
    TIME_MIN_TIMED timed steps), the run writes a checkpoint, evaluates and plots once, timing each, and
    sets tcfg.steps to the steps that fit what is left at the measured cost per step (the mean of the
    latest timed steps, plus the evaluations and checkpoints of eval_every / ckpt_every amortised), less
    the final checkpoint, evaluation and plot, with TIME_MARGIN to spare; never more than the steps
    given, which are an upper bound. A warmup longer than a fifth of that is cut to a fifth. The plan is
    a row of log.jsonl ({"step", "time_plan": {...}}) and one printed line.

    Why the steps and not the LR over elapsed time: the warmup does not depend on the total, so nothing
    before the plan changes, and after it the LR is a function of the step as in any run (lr_at): a run
    with the same plan is the same run, whatever the clock did, and a checkpoint records steps=N (and
    max_minutes=0), so `--resume auto` continues that schedule exactly; a schedule over elapsed time
    would make every LR depend on timing noise and a resume on the time already spent. A resume given
    --max-minutes again re-fits the remaining steps to its own budget (fewer, never more than the
    checkpoint's unless --steps says so).

    Should the steps then run slower than planned (the mean of the latest TIME_WINDOW steps), N shrinks
    to what still fits, checked after every step: the cosine ends a little early rather than the run
    late. N never grows. Under torchrun rank 0 decides and the ranks follow (one broadcast per step).
    """

    def __init__(self, max_minutes, started):
        self.budget_s = 60.0 * max_minutes
        self.started = started
        self.planned = False
        self.step_s = deque(maxlen=TIME_WINDOW)  # durations of this process's latest steps
        self.timed = 0
        self.eval_s = self.save_s = self.plot_s = 0.0
        self.announced = 0  # the steps of the plan or of the last shrink printed

    def elapsed(self):
        return time.perf_counter() - self.started

    def _per_step(self, tcfg):
        """Seconds one more step costs: the latest steps' mean, plus evaluations and checkpoints amortised."""
        per_step = sum(self.step_s) / len(self.step_s)
        if tcfg.eval_every:
            per_step += self.eval_s / tcfg.eval_every
        if tcfg.ckpt_every:
            per_step += self.save_s / tcfg.ckpt_every
        return per_step

    def _fit(self, run, margin):
        """The last step that fits the budget (at least run.step, at most tcfg.steps); rank 0's on every rank."""
        final_s = self.eval_s + self.save_s + self.plot_s
        left = self.budget_s - self.elapsed() - final_s
        fits = run.step + max(0, math.floor(margin * left / self._per_step(run.tcfg)))
        return _rank0(run, min(run.tcfg.steps, fits))

    def after_step(self, run, seconds, evaluate):
        """Time a step; plan at the end of warmup, shrink when behind. True when it wrote, evaluated or plotted."""
        tcfg = run.tcfg
        self.timed += 1
        if self.timed > TIME_SKIP:
            self.step_s.append(seconds)
        if run.step >= tcfg.steps:
            return False
        if self.planned:
            last = self._fit(run, 1.0)
            if last < tcfg.steps and last < 0.99 * self.announced:  # said once per 1% lost
                run.say(f"time budget: steps now take {self._per_step(tcfg) * 1e3:.1f} ms; the run ends at step "
                        f"{last} instead of {self.announced}")
                log_row(run, {"step": run.step, "time_shrink": {"steps": last, "was": self.announced}})
                self.announced = last
            tcfg.steps = min(tcfg.steps, last)
            return False
        if len(self.step_s) < TIME_MIN_TIMED or not _rank0(run, int(
                run.step >= tcfg.warmup_steps or self.elapsed() >= TIME_PLAN_FRACTION * self.budget_s)):
            return False
        t = time.perf_counter()
        save(run)
        self.save_s = time.perf_counter() - t
        t = time.perf_counter()
        _evaluate_and_log(run, evaluate)
        self.eval_s = time.perf_counter() - t
        t = time.perf_counter()
        if run.master and os.path.isfile(run.log_path):
            plot_losses(run.log_path, os.path.join(tcfg.out_dir, "loss.png"))
        self.plot_s = time.perf_counter() - t
        upper = tcfg.steps
        tcfg.steps = self.announced = self._fit(run, TIME_MARGIN)
        if run.step < tcfg.warmup_steps and tcfg.warmup_steps > tcfg.steps // 5:  # the plan came before warmup's end
            tcfg.warmup_steps = max(run.step, tcfg.steps // 5)
        tcfg.max_minutes = 0.0  # the checkpoints from here on hold an ordinary N-step run
        self.planned = True
        plan = {"steps": tcfg.steps, "upper_bound": upper, "warmup_steps": tcfg.warmup_steps,
                "budget_s": self.budget_s, "elapsed_s": round(self.elapsed(), 3),
                "ms_per_step": round(1e3 * self._per_step(tcfg), 3), "save_s": round(self.save_s, 3),
                "eval_s": round(self.eval_s, 3), "plot_s": round(self.plot_s, 3), "margin": TIME_MARGIN}
        log_row(run, {"step": run.step, "time_plan": plan})
        run.say(f"time budget: {self.budget_s:g} s, {plan['elapsed_s']:.1f} s spent by step {run.step}, "
                f"{plan['ms_per_step']:.1f} ms/step -> {tcfg.steps} steps (final checkpoint + eval + plot "
                f"{self.save_s + self.eval_s + self.plot_s:.1f} s)")
        return True


def _rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]  # lists when read back from a sharded checkpoint's JSON
    random.setstate((version, tuple(internal), gauss_next))
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


def _merge_on_resume(ckpt, model_config, tcfg, explicit):
    """(model_config, tcfg, changed) for a resume: the checkpoint's architecture (an explicit field that
    differs is an error), the checkpoint's training config with the explicit TRAIN_OVERRIDES applied."""
    saved_arch = ckpt["model_config"]
    clash = [f"{name} {getattr(model_config, name)!r} (checkpoint {saved_arch[name]!r})" for name in ARCH_FIELDS
             if name in explicit and name in saved_arch and getattr(model_config, name) != saved_arch[name]]
    if clash:
        raise TrainError("the architecture differs from the checkpoint's: " + ", ".join(clash) +
                         "; drop those flags to resume, or train a new run in another folder")
    names = {f.name for f in fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in names} |
                        {"data_dir": tcfg.data_dir, "out_dir": tcfg.out_dir})
    if "seed" in explicit and tcfg.seed != saved.seed:
        raise TrainError(f"seed {tcfg.seed} differs from the checkpoint's {saved.seed}; a resumed run keeps its "
                         "seed (its data order depends on it)")
    changed = []
    for name in TRAIN_OVERRIDES:
        new, old = getattr(tcfg, name), getattr(saved, name)
        if name in explicit and new != old:
            changed.append(f"{name} {old} -> {new}")
            setattr(saved, name, new)
    return GPTConfig(**saved_arch), saved, changed


def start(model_config, tcfg, resume=None, model=None, explicit=None, overwrite=False, impl="auto",
          grad_checkpoint=False, compile=False, classifier=False, parallel="ddp", mixed_precision=None,
          print_fn=print):
    """Set up a run (see the module docstring for the folder rules) and return its Run.

    resume: None (fresh), "auto" (the newest complete checkpoint: checkpoint.recover_checkpoint; a fresh
    run when RUN holds no run file) or a checkpoint path (file or DCP folder). model: an initial IGPT
    for fresh runs (default IGPT(model_config)). explicit: the
    names of the GPTConfig and TrainConfig fields the caller set on purpose (None: all of them). impl,
    grad_checkpoint, compile, parallel: how to run the model, never saved as architecture. classifier:
    the loss calls a model.Classifier around the model. parallel: "ddp" or "fsdp" (see the module
    docstring). mixed_precision (fsdp): bf16 parameters in forward/backward with fp32 gradient
    reduction; None means on with CUDA, off on CPU.
    """
    from igpt_fast.data import check_data, load_data_palette, read_meta
    from igpt_fast.model import Classifier

    if parallel not in PARALLEL:
        raise TrainError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    fsdp = parallel == "fsdp"
    if fsdp and classifier:
        raise TrainError("finetuning runs with DDP (its Classifier calls the model's parts, which FSDP does not "
                         "gather); train with --parallel fsdp, then finetune the run")
    if mixed_precision and not fsdp:
        raise TrainError("mixed_precision is FSDP's parameter dtype: use it with parallel='fsdp' (DDP runs use "
                         "bf16 autocast on CUDA)")
    explicit = set(ARCH_FIELDS + tuple(f.name for f in fields(TrainConfig))) if explicit is None else set(explicit)
    rank, world_size, _, device = setup_distributed(group_of_one=fsdp)
    say = print_fn if rank == 0 else (lambda *a, **k: None)
    meta = read_meta(tcfg.data_dir)
    palette = load_data_palette(tcfg.data_dir, meta)
    found = run_files(tcfg.out_dir)
    if resume == "auto":  # the newest complete checkpoint, wherever a killed save or rollback left it
        resume, notes = recover_checkpoint(tcfg.out_dir) if rank == 0 else (None, [])
        if world_size > 1:
            dist.barrier()
            resume = latest_checkpoint(tcfg.out_dir)
        if resume is None and found:
            raise TrainError(f"{tcfg.out_dir} holds {', '.join(found)} but no complete checkpoint to resume"
                             + "".join(f" ({why})" for why in notes) + ": pass --overwrite to start a new run there "
                             "(its checkpoints and log go), or --resume PATH")
        for note in notes:
            say(f"note: {note}")
    elif resume is None and found:
        if not overwrite:
            raise TrainError(f"{tcfg.out_dir} already holds a run ({', '.join(found)}): pass --resume auto to "
                             "continue it, or --overwrite to start a new run there (its checkpoints and log go)")
        if rank == 0:
            remove_checkpoints(tcfg.out_dir)
            if os.path.isfile(os.path.join(tcfg.out_dir, "log.jsonl")):
                os.remove(os.path.join(tcfg.out_dir, "log.jsonl"))
    resume = resolve_checkpoint(resume) if resume is not None else None
    sharded = resume is not None and is_sharded(resume)
    ckpt = load_checkpoint(resume, weights=False) if resume is not None else None
    if ckpt is not None:
        check_resumable(ckpt)
    changed = []
    if ckpt is not None:
        model_config, tcfg, changed = _merge_on_resume(ckpt, model_config, tcfg, explicit)
    check_data(meta, model_config, ckpt["palette_sha256"] if ckpt else None, tcfg.data_dir)

    torch.manual_seed(tcfg.seed + rank)
    random.seed(tcfg.seed + rank)
    if ckpt is not None and not sharded:
        model = model_from_checkpoint(ckpt, impl=impl, grad_checkpoint=grad_checkpoint)
    elif ckpt is not None or model is None:  # a sharded checkpoint's weights are loaded once the model is set up
        model = IGPT(model_config, impl=impl, grad_checkpoint=grad_checkpoint)
    model_config = model.config
    model.to(device)
    if fsdp:
        mixed_precision = device.type == "cuda" if mixed_precision is None else mixed_precision
        shard_model(model, mixed_precision)
    optimizer = configure_optimizer(model, tcfg.lr, tcfg.weight_decay)
    module = Classifier(model) if classifier else model
    if compile:
        module = torch.compile(module)
    if world_size > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    run = Run(tcfg, model, module, optimizer, palette, meta, rank, world_size, device, autocast, parallel=parallel,
              print_fn=print_fn)

    rng_state = None
    if ckpt is not None:
        if sharded:
            load_sharded_state(resume, model, optimizer)
        elif fsdp:
            load_full_optimizer_state(model, optimizer, ckpt["optimizer"])
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        run.step, run.data_step, run.saved_step = ckpt["step"], ckpt["data_step"], ckpt["step"]
        run.samples_seen = ckpt.get("samples_seen", ckpt["data_step"] * ckpt["train_config"]["batch_size"] *
                                    ckpt["world_size"])
        run.losses.extend(ckpt.get("recent_losses", []))
        if ckpt["world_size"] != world_size:
            say(f"note: the checkpoint has world size {ckpt['world_size']}, this run {world_size}: each rank "
                f"resumes its own data stream at micro-batch {run.data_step} (a valid order, not the one of an "
                "uninterrupted run) and fresh RNG states")
        rng_state = ckpt["rng"][rank] if len(ckpt["rng"]) == world_size else None
        if changed:
            say("changed on resume: " + ", ".join(changed))
        del ckpt
    if run.master:
        os.makedirs(tcfg.out_dir, exist_ok=True)
        if resume is not None:
            truncate_log(run.log_path, run.step)
        resolved = {"model": asdict(model_config), "train": asdict(tcfg), "world_size": world_size,
                    "device": str(device), "impl": impl, "grad_checkpoint": grad_checkpoint, "compile": compile,
                    "parallel": parallel, "mixed_precision": bool(mixed_precision),
                    "params": model.num_params(), "flops_per_token": flops_per_token(model),
                    "resumed_from": resume, "start_step": run.step, "changed_on_resume": changed,
                    "palette_sha256": palette.sha256}
        write_text_atomic(os.path.join(tcfg.out_dir, "config.json"), json.dumps(resolved, indent=2))
        say(json.dumps(resolved, indent=2))
        if tcfg.warmup_steps >= tcfg.steps:
            say(f"warning: warmup_steps {tcfg.warmup_steps} >= steps {tcfg.steps}: the learning rate only ramps up to "
                f"{lr_at(tcfg, tcfg.steps - 1):.3g} (peak --lr {tcfg.lr:.3g}) and never decays; lower --warmup-steps")
    run.rng_state = rng_state
    return run


def lm_loss(module, tokens, labels):
    """Pretraining objective (AR or BERT, as the model's config says): (loss, {})."""
    _, loss = module(tokens, tokens)
    return loss, {}


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


def train_step(run, batches, loss_fn=lm_loss):
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


def log_row(run, row):
    """Append one row to RUN/log.jsonl (main process)."""
    if run.master:
        with open(run.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")


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
    log_row(run, row)
    unplanned = run.tcfg.max_minutes > 0  # --max-minutes before its plan: steps is only an upper bound
    run.say(line(f"step {run.step}" + ("" if unplanned else f"/{run.tcfg.steps}"), loss=loss, **extra, lr=row["lr"],
                 ms_per_step=row["ms_per_step"], tok_per_s=tok_s, mfu=row.get("mfu"),
                 eta=None if unplanned else (run.tcfg.steps - run.step) * seconds_per_step))


def save(run, path=None, extra=None):
    """Write the training state (every rank's RNG state). path None: RUN/ckpt.pt, the previous one kept as
    ckpt.prev.pt (the main process writes); with FSDP RUN/ckpt.dcp and ckpt.prev.dcp, each rank writing
    its shards (collective)."""
    rngs = [None] * run.world_size
    if run.world_size > 1:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
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
def evaluate_lm(run):
    """Mean validation loss over the 'val' split (eval_batches per process, 0 = all), averaged over
    processes; {} when there is no val split. BERT masks come from a fixed seed so every eval sees
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
        log_row(run, {"step": run.step, **metrics})
        run.say(line(f"step {run.step}" + ("" if run.tcfg.max_minutes > 0 else f"/{run.tcfg.steps}"), **metrics))
    return metrics


class _StopOnSignal:
    """While the loop runs: SIGTERM and SIGINT set run.signal_received (the loop finishes its step, saves and
    stops; see the module docstring); a second SIGINT aborts at once (KeyboardInterrupt). Handlers are
    installed from the main thread only (Python's rule); the previous ones come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, run):
        self.run, self.previous = run, {}

    def _handle(self, signum, frame):
        if self.run.signal_received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.run.signal_received = self.run.signal_received or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _lock_run_folder(out_dir, parallel, print_fn):
    """Rank 0 locks RUN (runlog.RunLock) before anything reads or writes it; under torchrun the other ranks
    get its outcome, so every rank fails alike when the folder is in use. The lock (None off rank 0)."""
    rank, world_size, _, _ = setup_distributed(group_of_one=parallel == "fsdp")
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(out_dir).acquire()
        except IGPTError as e:
            error = e
    if world_size > 1:
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            error = TrainError(message[0])
    if error is not None:
        raise error
    if lock is not None and lock.stale:
        print_fn(f"note: {lock.path} was left by {lock.stale}, which ended without releasing it; taking it over")
    return lock


def train(model_config, tcfg, resume=None, model=None, explicit=None, overwrite=False, impl="auto",
          grad_checkpoint=False, compile=False, loss_fn=lm_loss, evaluate=evaluate_lm, on_eval=None,
          classifier=False, parallel="ddp", mixed_precision=None, print_fn=print):
    """Train; returns {"step", "loss", "val_loss", "ckpt", "skipped_shards"}. Setup arguments as `start`.
    Holds the run folder's lock throughout; raises RunStopped after saving when SIGTERM or SIGINT stopped it.

    loss_fn(module, tokens, labels) -> (loss, metrics) gets the wrapped module (so DDP syncs);
    evaluate(run) -> metrics; on_eval(run, metrics) -> True stops the run early."""
    started = time.perf_counter()  # the clock of max_minutes
    lock = _lock_run_folder(tcfg.out_dir, parallel, print_fn)
    try:
        run = start(model_config, tcfg, resume=resume, model=model, explicit=explicit, overwrite=overwrite,
                    impl=impl, grad_checkpoint=grad_checkpoint, compile=compile, classifier=classifier,
                    parallel=parallel, mixed_precision=mixed_precision, print_fn=print_fn)
        return _loop(run, loss_fn, evaluate, on_eval, started)
    finally:
        if lock is not None:
            lock.release()


def _loop(run, loss_fn, evaluate, on_eval, started=None):
    """train's loop over a Run set up by `start`."""
    from igpt_fast.data import train_loader

    tcfg = run.tcfg
    loader = train_loader(tcfg.data_dir, tcfg.batch_size, split="train", seed=tcfg.seed, rank=run.rank,
                          world_size=run.world_size, num_workers=tcfg.num_workers, start_step=run.data_step,
                          meta=run.meta, on_bad_shard=tcfg.on_bad_shard)
    batches = iter(loader)
    if run.rng_state is not None:  # after iter(): creating a DataLoader iterator draws from torch's RNG
        _set_rng_state(run.rng_state)
    run.module.train()
    loss, metrics, stopped = float("nan"), {}, False
    t0, timed = time.perf_counter(), 0
    budget = TimeBudget(tcfg.max_minutes, started or t0) if tcfg.max_minutes else None
    with _StopOnSignal(run):
        while run.step < tcfg.steps and not stopped:
            t_step = time.perf_counter()
            loss, grad_norm, extra = train_step(run, batches, loss_fn)
            if budget is not None and budget.after_step(run, time.perf_counter() - t_step, evaluate):
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
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        name = signal.Signals(run.stop_signal).name
        raise RunStopped(f"stopped by {name} after step {run.step}: checkpoint {run.ckpt_path} (step {run.step}); "
                         "continue with --resume auto", run.stop_signal)
    if not stopped:
        metrics = _evaluate_and_log(run, evaluate)
        if on_eval is not None:
            on_eval(run, metrics)
    if run.master and os.path.isfile(run.log_path):
        plot_losses(run.log_path, os.path.join(tcfg.out_dir, "loss.png"))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # every rank done before any tears its process group down (gloo aborts otherwise)
    return {"step": run.step, "loss": loss, "val_loss": metrics.get("val_loss"), "ckpt": run.ckpt_path,
            "skipped_shards": loader.skipped_shards}
