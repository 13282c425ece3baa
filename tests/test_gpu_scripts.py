"""The GPU-window scripts run end to end on CPU (--dry-run), so they cannot rot between GPU windows.

benchmarks/gpu_check.sh and benchmarks/gpu_results.sh are run as a person runs them, with tiny
shapes, the Triton interpreter / torch path and CUDA hidden; each must exit 0, record every step of
its plan as ok in summary.md, and leave at most 8 plain files in OUT_DIR (what the GPU machine
hands back), the results in results.tar.gz. Their install step really installs the project, offline,
into the run's venv over this interpreter, as on the GPU, and every later step runs that venv's python.
About a minute each on two idle cores.
"""
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_STEPS = ["install", "tests", "overhead", "train", "attention_d64", "softmax", "cross_entropy"]
RESULTS_STEPS = ["install", "data", "train_ar", "probe_ar", "train_ar_l", "probe_ar_l", "train_bert", "probe_bert",
                 "finetune_ar", "finetune_bert", "findings"]


def _run(script, tmp_path, *args, env=None):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), **(env or {})}
    env.pop("OUT", None)
    return subprocess.run(["bash", os.path.join(REPO, "benchmarks", script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def _dry_run(script, tmp_path):
    """Run SCRIPT --dry-run OUT; return (summary text, {member name: bytes} of results.tar.gz)."""
    out = tmp_path / "out"
    res = _run(script, tmp_path, "--dry-run", str(out))
    summary = (out / "summary.md").read_bytes().decode() if (out / "summary.md").exists() else ""
    assert res.returncode == 0, res.stdout + res.stderr + summary
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and "summary.md" in files and "results.tar.gz" in files, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files), files
    assert all((out / f).stat().st_size < 16 * 2**20 for f in files)
    with tarfile.open(out / "results.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert members["results/summary.md"].decode() == summary
    assert not [n for n in members if n.endswith((".pt", ".tar"))], "checkpoints or shards were packed"
    return summary, members


def _assert_steps_ok(summary, steps):
    planned = re.findall(r"^\| (\w+) \| \d+ \|", summary, flags=re.M)
    assert planned == steps + ["total"], planned
    for name in steps:
        assert re.search(rf"^## {name}: ok, \d+ s of \d+ s$", summary, flags=re.M), f"step {name} not ok:\n{summary}"
    assert re.search(r"^## end: \d+ s, every step ok$", summary, flags=re.M)


def _assert_installed_in_venv(summary, members, tmp_path, steps):
    """The install step put igpt-fast into the run's venv over PYTHON; every later step ran its python."""
    header = re.search(r"^python: (\S+), a venv over (\S+) ", summary, flags=re.M)
    assert header and header[2] == sys.executable, summary[:800]
    python = header[1]
    venv = os.path.dirname(os.path.dirname(python))
    assert re.fullmatch(re.escape(str(tmp_path)) + r"/igpt-gpu\.\w+/venv", venv), venv
    assert re.search(r"^## install: ok, \d+ s of \d+ s$", summary, flags=re.M), summary
    install = members["results/logs/install.log"].decode()
    assert re.search(rf"^igpt_fast \S+, installed in {re.escape(venv)}/lib/python3\.\d+/site-packages$", install,
                     flags=re.M), install
    assert "Successfully installed igpt-fast" in install and "igpt-fast --help ok" in install, install
    for name in steps[steps.index("install") + 1:]:
        log = members[f"results/logs/{name}.log"].decode()
        assert log.splitlines()[1] == f"# python: {python}", (name, log[:400])
    return python


def test_gpu_check_dry_run(tmp_path):
    summary, members = _dry_run("gpu_check.sh", tmp_path)
    _assert_steps_ok(summary, CHECK_STEPS)
    python = _assert_installed_in_venv(summary, members, tmp_path, CHECK_STEPS)
    assert f"`{python} -m pytest " in summary  # the tests step's command line
    assert "dry run (CPU" in summary
    junit = members["results/tests/junit.xml"].decode()
    assert re.search(r'tests="[1-9]', junit) and 'failures="0"' in junit and 'errors="0"' in junit
    for name in ["attention_d64/attention.csv", "softmax/softmax.csv", "cross_entropy/cross_entropy.csv",
                 "overhead/overhead.csv", "train/train_gpu.csv", "train/train_gpu_goals.csv"]:
        assert b"," in members["results/" + name], name
    for table in ["### attention", "### softmax", "### cross_entropy", "### overhead", "### train_gpu",
                  "### train_gpu_goals"]:
        assert table in summary, table
    assert "| ours | fwd+bwd | fp32 |" in summary  # the Triton kernel's own row, run under the interpreter
    # the training step's four variants at both shapes, each timed (impl=triton under the interpreter)
    train = members["results/train/train_gpu.md"].decode()
    for shape in ("4x4", "4x4 ckpt"):
        for variant in ("triton eager", "torch eager", "triton compiled", "torch compiled"):
            timed = rf"^\| {shape} \| {variant} \| \w+ \| \w+ \|( \d+ \|){{5}} \w+ \|( [\d.e+-]+ \|){{5}} .* \|  \|$"
            assert re.search(timed, train, flags=re.M), (shape, variant, train)  # ms .. tok_s; no error
    assert len(re.findall(r"^\| .* \| (yes|no|n/a) \|$", summary, flags=re.M)) == 5  # the goals, one row each
    assert {f"results/logs/{s}.log" for s in CHECK_STEPS} <= set(members)


def test_gpu_results_dry_run(tmp_path):
    summary, members = _dry_run("gpu_results.sh", tmp_path)
    _assert_steps_ok(summary, RESULTS_STEPS)
    _assert_installed_in_venv(summary, members, tmp_path, RESULTS_STEPS)
    total = re.search(r"^Expected total (\d+) s; x 1\.2 = (\d+) s of the 600 s window", summary, flags=re.M)
    assert total and int(total[2]) <= 600, summary[:3000]  # the plan with its 20% margin
    for name in ("ar", "ar_l", "bert"):
        for f in ("config.json", "log.jsonl", "loss.png", "probe.json", "probe.png"):
            assert f"results/runs/{name}/{f}" in members, (name, f)
        rows = [json.loads(ln) for ln in members[f"results/runs/{name}/log.jsonl"].decode().splitlines()]
        plan = next(r["time_plan"] for r in rows if "time_plan" in r)  # every run fitted its steps to its budget
        assert plan["budget_s"] > 0 and plan["steps"] <= plan["upper_bound"], plan
        probe = json.loads(members[f"results/runs/{name}/probe.json"])
        assert probe["n_train"] == 192 and probe["n_test"] == 80  # every train image (240 less 20% val), all test
    steps = {name: [r["step"] for r in map(json.loads, members[f"results/runs/{name}/log.jsonl"].decode().splitlines())
                    if "loss" in r][-1] for name in ("ar", "ar_l", "bert")}
    assert steps["ar_l"] <= steps["ar"] and steps["bert"] <= steps["ar"], steps  # no more tokens than AR-S
    for name in ("ar", "bert"):
        assert f"results/runs/{name}/finetune/finetune.json" in members, name
    assert re.search(r"^\| ar_l \| ar \| 4 x 32 \| [\d.]+M \| \d+ \(\d+\) \|", summary, flags=re.M)  # training table
    assert re.search(r"^\| bert( \| [01]\.\d{3})+ \| \d+ \([01]\.\d{3}\) \| [01]\.\d{3} \|$", summary, flags=re.M)
    assert re.search(r"^\| ar finetuned \| \d+ \| 8 \| [\d.e-]+ \| \d+ \| [01]\.\d{3} \| [01]\.\d{3} \|$", summary, flags=re.M)
    findings = re.findall(r"^\| \((\d\w?)\) .* \| (yes|no) \|$", summary, flags=re.M)
    assert [f for f, _ in findings] == ["1", "1", "2", "3a", "3b", "4"], findings
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["summary.md", "results.tar.gz", "probe_layers.png", "loss_ar.png", "loss_ar_l.png", "loss_bert.png",
         "finetune_ar.png", "finetune_bert.png"])


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_results.sh"])
def test_gpu_scripts_need_an_output_folder(script, tmp_path):
    res = _run(script, tmp_path)
    assert res.returncode == 2 and "usage: bash benchmarks/" in res.stderr
    res = _run(script, tmp_path, "--bogus", "out")
    assert res.returncode == 2 and "unknown option --bogus" in res.stderr
    assert not (tmp_path / "out").exists()
