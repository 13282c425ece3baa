"""The checkpoint format (igpt_fast.checkpoint): a model trained with the Triton kernels is probed,
sampled and finetuned in a process without them; checkpoints of format 1 (run-time settings saved in
model_config) still load; files that are not checkpoints, truncated files and weights that do not fit
their config give one-line errors."""
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from igpt_fast.checkpoint import (FORMAT_VERSION, CheckpointError, load_checkpoint, model_from_checkpoint,
                                  save_checkpoint)
from igpt_fast.cli import cli
from igpt_fast.model import GPTConfig
from igpt_fast.palette import Palette
from igpt_fast.train import RunOptions, TrainConfig, train
from shards import N_PX, N_VOCAB



@pytest.fixture(scope="module")
def triton_run(data_dir, tmp_path_factory):
    """Two steps trained with impl="triton" (the kernels under the interpreter, as on a GPU), plus a
    format-1 copy of its checkpoint that carries impl="triton" and grad_checkpoint=True in model_config."""
    pytest.importorskip("triton")
    run = tmp_path_factory.mktemp("triton") / "run"
    cfg = GPTConfig(n_px=N_PX, n_vocab=N_VOCAB, n_layer=2, n_head=2, n_embd=32)
    tcfg = TrainConfig(data_dir=data_dir, out_dir=str(run), steps=2, batch_size=4, eval_every=0, eval_batches=1)
    train(cfg, tcfg, RunOptions(impl="triton", grad_checkpoint=True), print_fn=lambda *a: None)
    old = torch.load(run / "ckpt.pt", weights_only=True)
    old["version"] = 1
    old["model_config"].update(impl="triton", grad_checkpoint=True)
    old["scheduler"] = {"last_epoch": 2}
    v1 = run.parent / "v1" / "ckpt.pt"
    v1.parent.mkdir()
    torch.save(old, v1)
    return run, v1.parent


def test_saved_config_is_architecture_only(triton_run):
    ckpt = load_checkpoint(triton_run[0])
    assert ckpt["version"] == FORMAT_VERSION
    assert "impl" not in ckpt["model_config"] and "grad_checkpoint" not in ckpt["model_config"]


def test_format_1_checkpoint_loads_without_its_run_time_settings(triton_run):
    with pytest.warns(UserWarning, match="ignoring the saved run-time setting.*impl, grad_checkpoint"):
        ckpt = load_checkpoint(triton_run[1])
    model = model_from_checkpoint(ckpt)
    assert model.impl == "auto" and not model.grad_checkpoint
    torch.testing.assert_close(model.state_dict(), load_checkpoint(triton_run[0])["model"])


@pytest.mark.parametrize("which", [0, 1])
def test_triton_trained_run_probes_samples_and_finetunes_without_triton(triton_run, data_dir, tmp_path, which):
    """The bug this format fixes: a run trained with --impl triton failed on a machine without the
    kernels. Here a fresh process without TRITON_INTERPRET (on CPU, impl auto is the torch path) runs
    probe, sample and finetune on the new-format run and on a format-1 file that says impl triton."""
    run = triton_run[which]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    script = (
        "import sys\n"
        "from igpt_fast.cli import cli\n"
        "run, data, out = sys.argv[1:4]\n"
        "for args in (['probe', run, '--data', data, '--max-iter', '5', '--no-pixels', '--out', out + '/p'],\n"
        "             ['sample', run, '--n-samples', '2', '--out', out + '/s'],\n"
        "             ['sample', run, '--data', data, '--n-images', '2', '--samples-per-image', '1', '--out', out + '/c'],\n"
        "             ['finetune', run, '--data', data, '--steps', '2', '--eval-every', '0', '--out', out + '/f']):\n"
        "    try:\n"
        "        cli(args)\n"
        "    except SystemExit as e:\n"
        "        if e.code:\n"
        "            raise\n")
    proc = subprocess.run([sys.executable, "-c", script, str(run), data_dir, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("p/probe.json", "s/samples.png", "c/completions.png", "f/finetune.json"):
        assert (tmp_path / name).is_file(), name


def test_not_a_checkpoint_is_a_one_line_error(data_dir, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    good = tmp_path / "good.pt"
    train(GPTConfig(n_px=N_PX, n_vocab=N_VOCAB, n_layer=1, n_head=2, n_embd=16),
          TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / "run"), steps=1, batch_size=2, eval_every=0,
                      eval_batches=1), print_fn=lambda *a: None)
    data = (tmp_path / "run" / "ckpt.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    good.write_bytes(data)
    for path, message in [(text, "not a readable igpt-fast checkpoint"), (truncated, "not a readable igpt-fast"),
                          (other, "not an igpt-fast checkpoint"), (tmp_path / "missing.pt", "not found")]:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
        for verb in (["probe", str(path), "--data", data_dir], ["sample", str(path)],
                     ["finetune", str(path), "--data", data_dir], ["convert", str(path), "--to", "hf", "--out",
                                                                   str(tmp_path / "hf")]):
            if not path.exists():
                continue  # click's own Path(exists=True) check answers first
            res = CliRunner().invoke(cli, verb)
            assert res.exit_code in (1, 2) and path.name in res.output, (verb, res.output)
            assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 2, res.output
    assert load_checkpoint(good)["step"] == 1


def test_weights_that_do_not_fit_name_the_key(tmp_path):
    model = GPTConfig(n_px=N_PX, n_vocab=N_VOCAB, n_layer=1, n_head=2, n_embd=16)
    from igpt_fast.checkpoint import model_state
    from igpt_fast.model import IGPT

    state = model_state(IGPT(model), None)
    state["model"]["h.0.mlp.c_fc.weight"] = torch.zeros(3, 3)
    del state["model"]["ln_f.weight"]
    save_checkpoint(tmp_path / "ckpt.pt", state)
    with pytest.raises(CheckpointError, match=r"missing ln_f\.weight.*shape h\.0\.mlp\.c_fc\.weight \(3, 3\)"):
        model_from_checkpoint(tmp_path)


def test_non_finite_weights_are_refused_on_load_naming_the_tensor(data_dir, tmp_path):
    from igpt_fast.checkpoint import model_state
    from igpt_fast.model import IGPT

    model = IGPT(GPTConfig(n_px=N_PX, n_vocab=N_VOCAB, n_layer=1, n_head=2, n_embd=16))
    palette = Palette.load(os.path.join(data_dir, "palette.npy"))
    state = model_state(model, palette)
    state["model"]["h.0.attn.c_proj.weight"][0, 0] = float("nan")
    save_checkpoint(tmp_path / "ckpt.pt", state)
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_proj\.weight holds non-finite"):
        model_from_checkpoint(tmp_path)
    for verb in (["probe", tmp_path, "--data", data_dir, "--no-pixels"], ["sample", tmp_path, "--n-samples", "1"],
                 ["finetune", tmp_path, "--data", data_dir, "--steps", "1"]):
        res = CliRunner().invoke(cli, [str(a) for a in verb])
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, (verb, res.output)
        assert "h.0.attn.c_proj.weight holds non-finite values" in res.output


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    import errno
    import io

    import igpt_fast.checkpoint as checkpoint_module

    cfg = GPTConfig(n_px=N_PX, n_vocab=N_VOCAB, n_layer=1, n_head=2, n_embd=16)
    tcfg = TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / "run"), steps=2, batch_size=2, eval_every=0,
                       eval_batches=1, ckpt_every=1)
    train(cfg, tcfg, print_fn=lambda *a: None)
    before = {n: (tmp_path / "run" / n).read_bytes() for n in ("ckpt.pt", "ckpt.prev.pt")}
    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *args, **kwargs):  # the checkpoint module's writes to a temp file hit a full disk
        return FullDisk(path, "w") if ".tmp" in os.fspath(path) and "w" in mode else open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", fake_open, raising=False)
    res = CliRunner().invoke(cli, ["train", "--data", data_dir, "--out", str(tmp_path / "run"), "--steps", "3",
                                   "--resume", "auto"])
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert res.exit_code == 1 and len(errors) == 1 and "Traceback" not in res.output, res.output
    assert errors[0].endswith("MiB free in " + str(tmp_path / "run") + ")"), errors
    assert "cannot write" in res.output and "ckpt.pt: no space left on device" in res.output
    assert {n: (tmp_path / "run" / n).read_bytes() for n in ("ckpt.pt", "ckpt.prev.pt")} == before
    assert sorted(n for n in os.listdir(tmp_path / "run") if n.startswith("ckpt")) == ["ckpt.prev.pt", "ckpt.pt"]


def test_export_and_convert_never_write_over_a_runs_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    train(GPTConfig(n_px=N_PX, n_vocab=N_VOCAB, n_layer=1, n_head=2, n_embd=16),
          TrainConfig(data_dir=data_dir, out_dir=str(run), steps=1, batch_size=2, eval_every=0, eval_batches=1),
          print_fn=lambda *a: None)
    before = (run / "ckpt.pt").read_bytes()
    for verb in (["export", run, "--out", run / "ckpt.pt"], ["export", run, "--out", run / "ckpt.prev.pt"],
                 ["export", run / "ckpt.pt", "--out", run / "ckpt.dcp"],
                 ["convert", run, "--to", "hf", "--out", run / "ckpt.dcp"]):
        res = CliRunner().invoke(cli, [str(a) for a in verb])
        assert res.exit_code == 1 and "is a name of the run" in res.output, (verb, res.output)
        assert len(res.output.strip().splitlines()) == 1
    assert (run / "ckpt.pt").read_bytes() == before and not (run / "ckpt.dcp").exists()
    assert load_checkpoint(run)["optimizer"]
    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(run / "model.pt")])  # another name is fine
    assert res.exit_code == 0, res.output
