"""What a run folder holds when a training run starts there, and what a resume takes from it.

Split from train.py, whose loop does not care where its state came from: `choose_checkpoint` applies
the folder rules, `merge_on_resume` decides which configuration wins, `restore` loads the training
state into a built Run, `rng_state` / `set_rng_state` are the per-rank RNG states a checkpoint carries.

Rules:
- a folder that holds a run (config.json, log.jsonl or any ckpt* entry) is continued only with
  resume="auto" (or a path) and restarted only with overwrite=True (its checkpoints and log go);
  anything else is refused, and so is resume="auto" when none of its checkpoints is complete.
  resume="auto" takes the newest complete checkpoint, wherever a kill left it
  (checkpoint.recover_checkpoint); a weights-only file (export, convert) is refused.
- The checkpoint's architecture wins; an architecture field the caller set explicitly and that
  differs is an error naming each field. Training fields set explicitly (lr, steps, batch size, ...;
  TRAIN_OVERRIDES) override the checkpoint's and are printed as "changed on resume"; the seed cannot
  change (the data order depends on it).
- The data position and optimizer state continue; RNG states are restored only when the world size
  is unchanged (distributed.py says what a resume on another number of processes does).
"""
import dataclasses
import os
import random

import torch
import torch.distributed as dist

from igpt_fast.checkpoint import (latest_checkpoint, load_full_optimizer_state, load_sharded_state, is_sharded,
                                  recover_checkpoint, remove_checkpoints, resolve_checkpoint, run_files)
from igpt_fast.errors import TrainError
from igpt_fast.model import GPTConfig

__all__ = ["TRAIN_OVERRIDES", "ARCH_FIELDS", "choose_checkpoint", "merge_on_resume", "restore", "rng_state",
           "set_rng_state"]

# Training fields a resume may change (given explicitly); the rest (seed, paths) stay the checkpoint's.
TRAIN_OVERRIDES = ("steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "lr_decay_steps",
                   "weight_decay", "grad_clip", "log_every", "eval_every", "eval_batches", "ckpt_every",
                   "num_workers", "peak_tflops", "spike_factor", "on_bad_shard", "max_minutes")
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig))


def choose_checkpoint(out_dir, resume, overwrite, rank, world_size, say):
    """The checkpoint to resume from (a path) or None for a fresh run, by the folder rules above; an
    overwritten run's checkpoints and log are removed here (rank 0)."""
    found = run_files(out_dir)
    if resume == "auto":  # the newest complete checkpoint, wherever a killed save or rollback left it
        resume, notes = recover_checkpoint(out_dir) if rank == 0 else (None, [])
        if world_size > 1:
            dist.barrier()
            resume = latest_checkpoint(out_dir)
        if resume is None and found:
            raise TrainError(f"{out_dir} holds {', '.join(found)} but no complete checkpoint to resume"
                             + "".join(f" ({why})" for why in notes) + ": pass --overwrite to start a new run there "
                             "(its checkpoints and log go), or --resume PATH")
        for note in notes:
            say(f"note: {note}")
    elif resume is None and found:
        if not overwrite:
            raise TrainError(f"{out_dir} already holds a run ({', '.join(found)}): pass --resume auto to "
                             "continue it, or --overwrite to start a new run there (its checkpoints and log go)")
        if rank == 0:
            remove_checkpoints(out_dir)
            if os.path.isfile(os.path.join(out_dir, "log.jsonl")):
                os.remove(os.path.join(out_dir, "log.jsonl"))
    return resolve_checkpoint(resume) if resume is not None else None


def merge_on_resume(ckpt, model_config, tcfg, explicit):
    """(model_config, tcfg, changed) for a resume: the checkpoint's architecture (an explicit field that
    differs is an error), the checkpoint's training config (tcfg's paths kept) with the explicit
    TRAIN_OVERRIDES applied."""
    saved_arch = ckpt["model_config"]
    clash = [f"{name} {getattr(model_config, name)!r} (checkpoint {saved_arch[name]!r})" for name in ARCH_FIELDS
             if name in explicit and name in saved_arch and getattr(model_config, name) != saved_arch[name]]
    if clash:
        raise TrainError("the architecture differs from the checkpoint's: " + ", ".join(clash) +
                         "; drop those flags to resume, or train a new run in another folder")
    names = {f.name for f in dataclasses.fields(tcfg)} - {"data_dir", "out_dir"}
    saved = dataclasses.replace(tcfg, **{k: v for k, v in ckpt["train_config"].items() if k in names})
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


def restore(run, ckpt):
    """Load a checkpoint's training state into a built train.Run: a sharded checkpoint's weights, the
    optimizer, step, data position, recent losses and (same world size only) this rank's RNG state."""
    if is_sharded(ckpt["path"]):
        load_sharded_state(ckpt["path"], run.model, run.optimizer)
    elif run.parallel == "fsdp":
        load_full_optimizer_state(run.model, run.optimizer, ckpt["optimizer"])
    else:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    run.step, run.data_step, run.saved_step = ckpt["step"], ckpt["data_step"], ckpt["step"]
    run.samples_seen = ckpt.get("samples_seen", ckpt["data_step"] * ckpt["train_config"]["batch_size"] *
                                ckpt["world_size"])
    run.losses.extend(ckpt.get("recent_losses", []))
    if ckpt["world_size"] != run.world_size:
        run.say(f"note: the checkpoint has world size {ckpt['world_size']}, this run {run.world_size}: each rank "
                f"resumes its own data stream at micro-batch {run.data_step} (a valid order, not the one of an "
                "uninterrupted run) and fresh RNG states")
    run.rng_state = ckpt["rng"][run.rank] if len(ckpt["rng"]) == run.world_size else None


def rng_state():
    """This process's RNG states (torch, Python, CUDA when present), as a checkpoint stores them per rank."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]  # lists when read back from a sharded checkpoint's JSON
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
