"""Two "nodes" on localhost: two torchrun launches of one process each, joined by a c10d rendezvous
(`--nnodes 2 --node_rank 0/1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT`), train with ddp and
with fsdp (the fsdp run's ranks write their checkpoint shards into the one shared run folder), and give
the losses of a single-launch 2-process run (`--standalone --nproc_per_node 2`), bit for bit."""
import os
import socket

from igpt_fast.checkpoint import load_checkpoint
from test_fsdp import launch, losses, train_command

STEPS = ["--steps", "2", "--ckpt-every", "0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nodes(data_dir, out, *flags):
    """The two launches of one run, one a node."""
    port = free_port()
    return [train_command(["--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--rdzv_backend=c10d",
                           f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=igpt-fast-test"],
                          data_dir, out, *STEPS, *flags) for rank in (0, 1)]


def test_two_nodes_match_one_launch_of_two_processes(data_dir, tmp_path):
    launch([train_command(["--standalone", "--nproc_per_node=2"], data_dir, tmp_path / "single", *STEPS),
            *nodes(data_dir, tmp_path / "ddp"), *nodes(data_dir, tmp_path / "fsdp", "--parallel", "fsdp")],
           tmp_path / "logs")
    single = losses(tmp_path / "single")
    assert sorted(single[0]) == [1, 2] and len(single[1]) == 1
    assert losses(tmp_path / "ddp") == single
    assert losses(tmp_path / "fsdp") == single
    for run in ("ddp", "fsdp"):
        ckpt = load_checkpoint(tmp_path / run)
        assert ckpt["world_size"] == 2 and ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(tmp_path / "fsdp" / "ckpt.dcp"))
