"""FSDP2 training (`--parallel fsdp`) on CPU over gloo, checked against DDP: the same losses bit for bit
(with accumulation and clipping); evaluation in lockstep over ranks with unequal val batches; sharded
checkpoints (RUN/ckpt.dcp) that resume bitwise (weights and AdamW state), load exactly on 1 process
from 2 (fsdp -> ddp, ddp -> fsdp), resume on 2 processes from 1; divergence rollback across checkpoint
kinds; `igpt-fast export` and the verbs that read a sharded run without torch.distributed. torchrun
launches run concurrently (each is mostly start-up) on tiny models."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from igpt_fast.checkpoint import CheckpointError, export_checkpoint, load_checkpoint, model_from_checkpoint
from igpt_fast.cli import cli
from igpt_fast.model import GPTConfig
from igpt_fast.distributed import cleanup_distributed
from igpt_fast.runlog import read_log
from igpt_fast.train import Objective, RunOptions, TrainConfig, TrainError, TrainingDiverged, start, train
from shards import N_PX, N_VOCAB, ramp_samples, write_dataset

ARCH = ["--n-px", str(N_PX), "--n-layer", "2", "--n-head", "2", "--n-embd", "32"]
# 4 optimizer steps of 2 micro-batches (accumulation without gradient sync), clipping on, checkpoints at 2 and 4
TRAIN = [*ARCH, "--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2", "--warmup-steps", "2",
         "--log-every", "1", "--eval-every", "0", "--eval-batches", "0", "--ckpt-every", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crashing rank logs its Python stacks


def model_config():
    return GPTConfig(n_px=N_PX, n_vocab=N_VOCAB, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The shared dataset's layout (val shards of 8, 8 and 4) with ramp_samples' images, on which the
    weights FSDP and DDP reach agree within the tolerance below."""
    return write_dataset(tmp_path_factory.mktemp("data"), ramp_samples)


def train_command(launcher, data_dir, out, *flags):
    """`igpt-fast train` under torchrun with the launcher arguments given (e.g. --standalone ...)."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "igpt_fast.cli", "train", "--data",
            str(data_dir), "--out", str(out), *TRAIN, *map(str, flags)]


def two_processes(data_dir, out, *flags):
    return train_command(["--standalone", "--nproc_per_node=2"], data_dir, out, *flags)


def launch(commands, logs, timeout=300):
    """Run the commands at once; assert each exits 0 (its output, kept in logs/, shown otherwise)."""
    os.makedirs(logs, exist_ok=True)
    procs = []
    for i, cmd in enumerate(commands):
        out = open(os.path.join(logs, f"launch{i}.txt"), "w")
        procs.append((subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT), out))
    try:
        for proc, out in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc, out in procs:
            proc.kill()
            out.close()
    for i, (proc, _) in enumerate(procs):
        text = open(os.path.join(logs, f"launch{i}.txt")).read()
        assert proc.returncode == 0, f"{' '.join(commands[i][-30:])}\n{text[-4000:]}"


def losses(run):
    rows = read_log(os.path.join(run, "log.jsonl"))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r["val_loss"] for r in rows if "val_loss" in r]


def full_state(path, tmp):
    """{"model": {name: tensor}, "optimizer": {"state": {name: {...}}, ...}} of a DCP folder, whole."""
    dcp_to_torch_save(path, tmp)
    return torch.load(tmp, weights_only=False)


def assert_same_state(a, b):
    assert sorted(a["model"]) == sorted(b["model"])
    for name, v in a["model"].items():
        assert torch.equal(v, b["model"][name]), name
    assert sorted(a["optimizer"]["state"]) == sorted(b["optimizer"]["state"])
    for name, s in a["optimizer"]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[key], b["optimizer"]["state"][name][key]), (name, key)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """RUN/fsdp and RUN/ddp: the same 4 steps on 2 processes (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("runs")
    launch([two_processes(data_dir, root / "fsdp", "--parallel", "fsdp"), two_processes(data_dir, root / "ddp")],
           root / "logs")
    return root


def test_fsdp_matches_ddp_and_writes_sharded_checkpoints(runs, tmp_path):
    fsdp, ddp = losses(runs / "fsdp"), losses(runs / "ddp")
    assert sorted(fsdp[0]) == [1, 2, 3, 4]
    assert fsdp == ddp  # bitwise: train losses and the final val loss (lockstep eval, 3 vs 2 batches)
    cfg = json.loads((runs / "fsdp" / "config.json").read_text())
    assert cfg["parallel"] == "fsdp" and cfg["world_size"] == 2 and cfg["mixed_precision"] is False
    assert "parallel" not in cfg["model"]
    dcp = runs / "fsdp" / "ckpt.dcp"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "info.json"} <= set(os.listdir(dcp))  # a shard per rank
    assert sorted(os.listdir(runs / "fsdp")) == ["ckpt.dcp", "ckpt.prev.dcp", "config.json", "log.jsonl", "loss.png"]
    sharded, single = load_checkpoint(runs / "fsdp"), load_checkpoint(runs / "ddp")  # no process group here
    assert sharded["path"] == str(dcp) and sharded["step"] == 4 and len(sharded["rng"]) == 2
    assert sharded["samples_seen"] == single["samples_seen"] == 4 * 4 * 2 * 2
    assert load_checkpoint(runs / "fsdp" / "ckpt.prev.dcp")["step"] == 2
    for name, v in single["model"].items():  # the gradient norm sums in another order: weights agree to ~1e-7
        torch.testing.assert_close(sharded["model"][name], v, rtol=0, atol=1e-6)
    model = model_from_checkpoint(runs / "fsdp").eval()
    tokens = torch.arange(N_PX * N_PX).view(1, -1) % N_VOCAB
    assert torch.isfinite(model(tokens, tokens)[1])


@pytest.fixture(scope="module")
def resumed(data_dir, runs, tmp_path_factory):
    """2-process resumes: of RUN/fsdp's step-2 checkpoint (with activation checkpointing, which changes
    nothing), and of a 1-process fsdp run's step-2 checkpoint, with ddp and with fsdp."""
    root = tmp_path_factory.mktemp("resumed")
    one = root / "one"
    res = CliRunner().invoke(cli, ["train", "--data", data_dir, "--out", str(one), *TRAIN, "--steps", "2",
                                   "--parallel", "fsdp"])
    assert res.exit_code == 0, res.output
    launch([two_processes(data_dir, root / "fsdp", "--parallel", "fsdp", "--grad-checkpoint",
                          "--resume", runs / "fsdp" / "ckpt.prev.dcp"),
            two_processes(data_dir, root / "one_to_two_ddp", "--resume", one / "ckpt.dcp"),
            two_processes(data_dir, root / "one_to_two_fsdp", "--parallel", "fsdp", "--resume", one / "ckpt.dcp")],
           root / "logs")
    return root


def test_sharded_resume_is_bitwise(runs, resumed, tmp_path):
    straight, again = losses(runs / "fsdp"), losses(resumed / "fsdp")
    assert again[0] == {3: straight[0][3], 4: straight[0][4]} and again[1] == straight[1]
    assert_same_state(full_state(runs / "fsdp" / "ckpt.dcp", tmp_path / "a.pt"),
                      full_state(resumed / "fsdp" / "ckpt.dcp", tmp_path / "b.pt"))  # weights and AdamW state


def test_one_process_checkpoint_resumes_on_two(resumed):
    ddp, fsdp = losses(resumed / "one_to_two_ddp"), losses(resumed / "one_to_two_fsdp")
    assert sorted(ddp[0]) == [3, 4] and ddp == fsdp
    out = open(resumed / "logs" / "launch1.txt").read()
    assert "world size 1, this run 2" in out
    ckpt = load_checkpoint(resumed / "one_to_two_ddp")
    assert ckpt["world_size"] == 2 and ckpt["data_step"] == 8  # micro-batches per rank: 2 x 2 before, 2 x 2 after
    assert ckpt["samples_seen"] == 4 * 2 * 2 * (1 + 2)  # batch x accum x steps x processes, before + after


def loaded_state(run):
    """The full model and name-keyed optimizer state of a started Run (sharded or not)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in run.model.state_dict().items()}
    return {"model": model, "optimizer": get_optimizer_state_dict(run.model, run.optimizer,
                                                                  options=StateDictOptions(full_state_dict=True))}


def test_two_process_checkpoints_load_exactly_on_one_with_ddp_or_fsdp(data_dir, runs, tmp_path):
    """2 -> 1 for both kinds of checkpoint, each into ddp and fsdp: the weights and AdamW state loaded
    are the saved ones, bit for bit; then one more step gives the same loss with ddp and fsdp."""
    flags = dict(steps=4, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2, log_every=1, eval_every=0,
                 eval_batches=0, ckpt_every=2)
    plain = start(model_config(), TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / "plain"), **flags),
                  resume=str(runs / "ddp" / "ckpt.prev.pt"), print_fn=lambda *a: None)  # ckpt.pt's own loader: the reference
    sources = {runs / "fsdp" / "ckpt.prev.dcp": full_state(runs / "fsdp" / "ckpt.prev.dcp", tmp_path / "saved.pt"),
               runs / "ddp" / "ckpt.prev.pt": loaded_state(plain)}
    for i, (source, saved) in enumerate(sources.items()):
        for parallel in ("ddp", "fsdp"):
            tcfg = TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / f"start{i}_{parallel}"), **flags)
            try:
                run = start(model_config(), tcfg, RunOptions(parallel=parallel), resume=str(source),
                            print_fn=lambda *a: None)
                assert (run.step, run.data_step, run.samples_seen, run.world_size) == (2, 4, 32, 1)
                assert run.rng_state is None  # saved by 2 ranks: not restored on 1
                assert_same_state(loaded_state(run), saved)
            finally:
                cleanup_distributed()
    prev = runs / "fsdp" / "ckpt.prev.dcp"
    results = {}
    for parallel in ("ddp", "fsdp"):
        res = CliRunner().invoke(cli, ["train", "--data", data_dir, "--out", str(tmp_path / parallel), *TRAIN,
                                       "--steps", "3", "--parallel", parallel, "--resume", str(prev)])
        assert res.exit_code == 0, res.output
        assert "world size 2, this run 1" in res.output
        results[parallel] = losses(tmp_path / parallel)
    assert sorted(results["ddp"][0]) == [3] and results["ddp"] == results["fsdp"]


def exploding(bad_call):
    calls = [0]

    def loss_fn(module, tokens, labels):
        calls[0] += 1
        _, loss = module(tokens, tokens)
        return (loss * float("nan") if calls[0] == bad_call else loss), {}
    return loss_fn


def test_divergence_restores_the_previous_checkpoint_of_either_kind(data_dir, tmp_path):
    tcfg = TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / "a"), steps=8, batch_size=4, lr=1e-2,
                       warmup_steps=2, log_every=1, eval_every=0, ckpt_every=2)
    quiet = lambda *a: None  # noqa: E731
    try:  # checkpoints at 2 and 4 (both sharded), a NaN at step 5: ckpt.prev.dcp (step 2) becomes ckpt.dcp
        with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*ckpt\.dcp \(step 2, restored"):
            train(model_config(), tcfg, RunOptions(parallel="fsdp"), objective=Objective(loss=exploding(5)),
                  print_fn=quiet)
    finally:
        cleanup_distributed()
    assert sorted(n for n in os.listdir(tmp_path / "a") if n.startswith("ckpt")) == ["ckpt.dcp"]
    assert load_checkpoint(tmp_path / "a")["step"] == 2

    # a DDP run (ckpt.pt at 2) resumed with FSDP (ckpt.dcp at 4; ckpt.pt becomes ckpt.prev.pt), NaN at step 5
    b = dataclasses.replace(tcfg, out_dir=str(tmp_path / "b"), steps=2)
    train(model_config(), b, print_fn=quiet)
    try:
        with pytest.raises(TrainingDiverged, match=r"ckpt\.pt \(step 2, restored"):
            train(model_config(), dataclasses.replace(b, steps=8), RunOptions(parallel="fsdp"), resume="auto",
                  objective=Objective(loss=exploding(3)), print_fn=quiet)
    finally:
        cleanup_distributed()
    assert sorted(n for n in os.listdir(tmp_path / "b") if n.startswith("ckpt")) == ["ckpt.pt"]
    assert load_checkpoint(tmp_path / "b")["step"] == 2


def test_export_makes_one_file_that_loads_without_torch_distributed(runs, tmp_path):
    res = CliRunner().invoke(cli, ["export", str(runs / "fsdp"), "--out", str(tmp_path / "model.pt")])
    assert res.exit_code == 0, res.output
    assert "sharded (DCP), step 4" in res.output
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "optimizer" not in exported and exported["step"] == 4
    assert exported["palette_sha256"] == load_checkpoint(runs / "fsdp")["palette_sha256"]
    sharded = load_checkpoint(runs / "fsdp")["model"]
    for name, v in model_from_checkpoint(tmp_path / "model.pt").state_dict().items():
        assert torch.equal(v, sharded[name]), name
    export_checkpoint(runs / "ddp", tmp_path / "ddp.pt")  # a ddp run: its model part
    assert load_checkpoint(tmp_path / "ddp.pt")["model"].keys() == load_checkpoint(runs / "ddp")["model"].keys()
    with pytest.raises(CheckpointError, match="is a folder"):
        export_checkpoint(runs / "fsdp", tmp_path)
    # the verbs that read a run take the sharded run folder itself
    res = CliRunner().invoke(cli, ["sample", str(runs / "fsdp"), "--n-samples", "2", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "s" / "samples.npy").shape == (2, N_PX * N_PX)


def test_single_process_fsdp_options_and_errors(data_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--data", data_dir, "--out", str(tmp_path / "bf16"), *TRAIN, "--steps", "2",
                              "--parallel", "fsdp", "--mixed-precision", "--grad-checkpoint"])
    assert res.exit_code == 0, res.output  # bf16 parameters on CPU when asked
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["parallel"] == "fsdp" and cfg["mixed_precision"] is True and cfg["world_size"] == 1
    assert all(np.isfinite(list(losses(tmp_path / "bf16")[0].values())))
    (tmp_path / "bf16" / "ckpt.dcp.tmp").mkdir()  # what a save killed midway leaves: never read, then cleared
    (tmp_path / "bf16" / "ckpt.dcp.tmp" / "__0_0.distcp").write_bytes(b"half")
    res = runner.invoke(cli, ["train", "--data", data_dir, "--out", str(tmp_path / "bf16"), *TRAIN, "--steps", "3",
                              "--parallel", "fsdp", "--resume", "auto"])
    assert res.exit_code == 0, res.output
    assert sorted(n for n in os.listdir(tmp_path / "bf16") if n.startswith("ckpt")) == ["ckpt.dcp", "ckpt.prev.dcp"]
    assert load_checkpoint(tmp_path / "bf16" / "ckpt.prev.dcp")["step"] == 2
    assert load_checkpoint(tmp_path / "bf16")["step"] == 3
    res = runner.invoke(cli, ["train", "--data", data_dir, "--out", str(tmp_path / "x"), *TRAIN, "--mixed-precision"])
    assert res.exit_code == 2 and "--parallel fsdp" in res.output
    tcfg = TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / "c"))
    with pytest.raises(TrainError, match="finetuning runs with DDP"):
        start(model_config(), tcfg, RunOptions(parallel="fsdp"), classifier=True)
    with pytest.raises(TrainError, match="parallel must be one of"):
        RunOptions(parallel="zero")


class _Planted:
    """A pickle whose loading runs a shell command (it creates the marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_metadata_pickle_is_refused_not_run(data_dir, runs, tmp_path):
    import pickle

    run = tmp_path / "run"
    shutil.copytree(runs / "fsdp", run)
    shutil.rmtree(run / "ckpt.prev.dcp")
    marker = tmp_path / "executed"
    (run / "ckpt.dcp" / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    verbs = [["probe", run, "--data", data_dir, "--max-iter", "2", "--no-pixels"], ["sample", run, "--n-samples", "1"],
             ["export", run, "--out", tmp_path / "model.pt"], ["convert", run, "--to", "hf", "--out", tmp_path / "hf"],
             ["train", "--data", data_dir, "--out", run, *TRAIN, "--steps", "6", "--parallel", "fsdp", "--resume",
              "auto"],
             ["train", "--data", data_dir, "--out", tmp_path / "other", *TRAIN, "--steps", "6", "--parallel", "fsdp",
              "--resume", run / "ckpt.dcp"]]
    for verb in verbs:
        res = CliRunner().invoke(cli, [str(a) for a in verb])
        cleanup_distributed()
        assert not marker.exists(), verb
        assert res.exit_code == 1 and "Traceback" not in res.output, (verb, res.output)
        assert len(res.output.strip().splitlines()) == 1 and ".metadata" in res.output, (verb, res.output)
    assert "was not loaded" in res.output and "posix.system" in res.output


def test_missing_or_truncated_shards_are_one_line_errors(data_dir, runs, tmp_path):
    for damage in ("missing", "truncated"):
        run = tmp_path / damage
        shutil.copytree(runs / "fsdp", run)
        shard = run / "ckpt.dcp" / "__1_0.distcp"
        if damage == "missing":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:100])
        for verb in (["sample", run / "ckpt.dcp", "--n-samples", "1"],
                     ["export", run / "ckpt.dcp", "--out", run / "m.pt"],
                     ["train", "--data", data_dir, "--out", tmp_path / f"{damage}2", *TRAIN, "--steps", "6", "--resume",
                      run / "ckpt.dcp"]):
            res = CliRunner().invoke(cli, [str(a) for a in verb])
            cleanup_distributed()
            assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, (verb, res.output)
            assert f"__1_0.distcp is {damage}" in res.output, res.output
        # --resume auto falls back to the previous checkpoint, naming what it set aside
        res = CliRunner().invoke(cli, ["train", "--data", data_dir, "--out", str(run), *TRAIN, "--steps", "3",
                                       "--parallel", "fsdp", "--resume", "auto"])
        cleanup_distributed()
        assert res.exit_code == 0, res.output
        assert "ckpt.dcp set aside as ckpt.dcp.damaged" in res.output and "ckpt.prev.dcp (step 2)" in res.output
        assert sorted(losses(run)[0]) == [1, 2, 3]


def test_killed_sharded_save_resumes_from_the_complete_temp_folder(data_dir, runs, tmp_path):
    """The window of a folder save: ckpt.dcp renamed to ckpt.prev.dcp, the complete ckpt.dcp.tmp not yet
    renamed. Before, --resume auto started a fresh run and later deleted the complete temp folder."""
    run = tmp_path / "run"
    shutil.copytree(runs / "fsdp", run)
    shutil.rmtree(run / "ckpt.prev.dcp")
    os.replace(run / "ckpt.dcp", run / "ckpt.dcp.tmp")
    shutil.copytree(runs / "fsdp" / "ckpt.prev.dcp", run / "ckpt.prev.dcp")
    res = CliRunner().invoke(cli, ["train", "--data", data_dir, "--out", str(run), *TRAIN, "--steps", "5",
                                   "--parallel", "fsdp", "--resume", "auto"])
    cleanup_distributed()
    assert res.exit_code == 0, res.output
    assert "ckpt.dcp.tmp (step 4) is the newest complete checkpoint" in res.output
    assert json.loads((run / "config.json").read_text())["start_step"] == 4
    assert sorted(losses(run)[0]) == [1, 2, 3, 4, 5]
    assert load_checkpoint(run / "ckpt.prev.dcp")["step"] == 4
