"""Processes and parallelism for training: the torchrun process group, DDP or FSDP2.

Parallelism (`parallel`, chosen per run like impl; recorded in config.json, never architecture):
- "ddp" (default): DistributedDataParallel over the processes of a torchrun launch; rank 0 writes
  RUN/ckpt.pt.
- "fsdp": FSDP2 -- `fully_shard` on every block, then on the root, after rank 0's initial weights
  are broadcast; the optimizer is built on the sharded (DTensor) parameters; bf16 parameters with
  fp32 gradient reduction on CUDA (`mixed_precision`, off on CPU unless asked). Accumulation turns
  gradient sync off (`set_requires_gradient_sync`) until the last micro-batch; clipping takes the
  global norm of the DTensor gradients. run.model is the sharded model itself, so evaluation runs
  through it on every rank in lockstep (train.evaluate_gen_loss). Checkpoints are RUN/ckpt.dcp/ folders
  (torch.distributed.checkpoint, every rank writing its shards; see checkpoint.py). One process
  (no torchrun) gets a process group of its own. On CPU over gloo, fsdp gives the same losses as
  ddp, bit for bit (the weights agree to ~1e-7: the gradient norm is summed in another order).
  Finetuning (classifier=True) stays on DDP.
- Either resumes from a checkpoint of either kind, on any number of processes (DCP reshards).

A resume on another number of processes (N -> M) keeps the optimizer step (so the LR schedule) and
the per-rank micro-batch count: rank r < min(N, M) continues its own stream where it stopped (a
rank's stream depends on (seed, rank, num_workers), not on the world size), a new rank r >= N starts
its stream at that same micro-batch, and the streams of ranks >= M are left. The order differs from
an uninterrupted run's but is as valid (training shards are resampled, there is no epoch to finish).
The global batch becomes batch_size x grad_accum x M; samples_seen keeps the true total. RNG states
are restored only when the world size is unchanged; otherwise each rank starts from seed + rank.

Workers outlive no launcher: torchrun starts each worker as a child of its agent (the `torchrun`
process itself), in a session of its own, and forwards SIGTERM / SIGINT to it on shutdown; when the
agent is killed outright (kill -9, OOM killer) nothing tells the workers, which used to train on as
orphans. `watch_launcher` (started by setup_distributed under torchrun) is a daemon thread that polls
os.getppid() twice a second (portable, and unlike prctl's PR_SET_PDEATHSIG not fooled by the exit of
the agent thread that spawned the worker): once the parent is gone it sends its own process SIGTERM,
so the training loop finishes its step, saves and exits as on torchrun's own shutdown (train.py), and
if the process still lives LAUNCHER_GRACE_S later (a collective waiting for a rank that is gone) it
exits at once with status 143. A launcher that died before the worker's first getppid is not seen.
"""
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

__all__ = ["setup_distributed", "cleanup_distributed", "is_main_process", "all_reduce_sum", "shard_model",
           "watch_launcher", "LAUNCHER_GRACE_S"]

LAUNCHER_GRACE_S = 60  # after the launcher is gone: time to finish the step and save before a hard exit
_watching = []


def setup_distributed(group_of_one=False):
    """(rank, world_size, local_rank, device). Under torchrun: init the process group (nccl on GPU,
    gloo on CPU); otherwise a single process, with a process group of its own when group_of_one
    (FSDP shards over a device mesh even on one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    elif group_of_one and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    watch_launcher()
    return rank, world_size, local_rank, device


def watch_launcher(grace_s=LAUNCHER_GRACE_S, interval_s=0.5):
    """Under torchrun (TORCHELASTIC_RUN_ID set), once per process: a daemon thread that sends this process
    SIGTERM when its parent, the torchrun agent, is gone, and ends it with status 143 grace_s later if it
    still runs (see the module docstring). Outside torchrun: nothing."""
    if _watching or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(128 + signal.SIGTERM)

    _watching.append(threading.Thread(target=watch, name="igpt-fast-launcher-watch", daemon=True))
    _watching[0].start()


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process():
    """True outside torchrun and on its rank 0: the process that prints per-run lines."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard_model(model, mixed_precision=False):
    """FSDP2: every block, then the root (embeddings, ln_f, heads), sharded over all ranks with
    `fully_shard`, after rank 0's weights are broadcast (as DDP does, so a fresh run starts from one
    initialisation). mixed_precision: bf16 parameters in forward/backward, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if dist.get_world_size() > 1:
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
              else MixedPrecisionPolicy())
    for block in model.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
