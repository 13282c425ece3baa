"""benchmarks/gpu_sweep.sh runs end to end on CPU (--dry-run), so the sweep cannot rot between GPU windows.

One tiny shape (fp32, D 32, T 100, causal) under the Triton interpreter with CUDA hidden: the install
step really installs the project, offline, into the run's venv (as on the GPU); the sweep step checks
each candidate variant against the fp32 reference, times it, and merges the winner into OUT/defaults.json,
a copy of the project's table. About a minute on two loaded cores.
"""
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_sweep_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)
    res = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_sweep.sh"), "--dry-run", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    assert res.returncode == 0, res.stdout + res.stderr + summary
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and {"summary.md", "results.tar.gz", "defaults.json", "attention_sweep.md"} <= set(files), files
    assert re.findall(r"^\| (\w+) \| \d+ \|", summary, flags=re.M) == ["install", "sweep", "total"]
    assert re.search(r"^## sweep: ok, \d+ s of \d+ s$", summary, flags=re.M), summary

    with open(os.path.join(REPO, "igpt_fast", "kernels", "defaults.json")) as f:
        project = json.load(f)["entries"]
    entries = json.loads((out / "defaults.json").read_text())["entries"]
    new = [e for e in entries if e["capability"] == "cpu"]
    assert len(entries) == len(project) + len(new)  # the project's entries kept, the sweep's added
    assert sorted(e["mode"] for e in new) == ["fwd", "fwd+bwd"]
    for e in new:
        assert (e["op"], e["dtype"], e["width"], e["causal"], e["size"]) == ("attention", "fp32", 32, True, 100)
        assert e["config"]["bwd"] in ("split", "fused_atomic") and e["config"]["order"] in ("natural", "heavy_first")
        assert e["config"]["io"] in ("pointer", "tma")
        assert e["torch_backend"] == "default" and e["ours_ms"] > 0 and e["torch_ms"] > 0
        # every candidate was checked and timed: both orders, both I/O modes (the dry run times tma as an
        # sm_90 sweep does), forward tiles, split and fused backward
        timed = [k for k, ms in e["timings"].items() if ms is not None]
        for part in ("fwd order=natural", "fwd order=heavy_first", "io=pointer", "io=tma", "io=tma bwd=split",
                     "bwd=split", "bwd=fused_atomic", "fwd sdpa"):
            assert any(part in k for k in timed), (part, e["timings"])
    table = (out / "attention_sweep.md").read_text()
    assert "winner: " in table and "sdpa" in table
