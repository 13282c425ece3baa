"""The project installs offline the way the GPU machine installs it, and its wheel holds the whole package.

The GPU machine has no network and its image's own setuptools (>= 80): benchmarks/gpu_steps.sh makes a
venv over its python (gpu_venv) and runs `pip install --no-index --no-deps --no-build-isolation -e .`
in it (gpu_install_project). These tests source that file and call the same functions with this
interpreter's environment as the base, on a copy of the files the device machine receives (tracked
files and untracked ones git does not ignore, as they are in the working tree), with pip unable to
reach any index. A wheel of that copy must carry the Triton modules of the top-level kernels/ folder
inside igpt_fast/kernels/, never as a top-level `kernels` package (Hugging Face's name).
"""
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_MODULES = ["__init__", "flash_attention", "attention_configs", "fused_softmax", "fused_cross_entropy", "_common",
                  "reference"]
NO_PROXY = "http://127.0.0.1:9"  # the discard port: any HTTP(S) request through it fails at once


def _offline_env():
    """os.environ without pip settings, config files or PYTHONPATH; no index, and no network for HTTP."""
    drop = ("PIP_", "PYTHONPATH", "PYTHONHOME", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(drop)}
    env.update(PIP_NO_INDEX="1", PIP_INDEX_URL="file:///nonexistent/igpt-fast-offline/simple",
               PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
               http_proxy=NO_PROXY, https_proxy=NO_PROXY, HTTP_PROXY=NO_PROXY, HTTPS_PROXY=NO_PROXY)
    return env


def _run(cmd, cwd):
    """Run CMD offline in CWD; fail with its output unless it exits 0; return its stdout."""
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_offline_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture
def source_copy(tmp_path):
    """A copy of what the GPU machine gets of the checkout, at tmp_path/igpt-fast."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    copy = tmp_path / "igpt-fast"
    for name in filter(None, names):
        source = os.path.join(REPO, name)
        if os.path.isfile(source):  # a tracked file deleted in the working tree stays deleted
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy


def test_editable_install_offline_as_on_the_gpu(source_copy, tmp_path):
    venv = tmp_path / "venv"
    _run(["bash", "-c", 'source benchmarks/gpu_steps.sh && PY="$1" && gpu_venv "$2" && gpu_install_project',
          "bash", sys.executable, venv], cwd=source_copy)
    # Run from tmp_path, neither the checkout nor the copy, so the import comes from what got installed.
    found = json.loads(_run([venv / "bin" / "python", "-c", textwrap.dedent("""
        import inspect, json, sys
        import setuptools
        import igpt_fast.kernels
        import igpt_fast.kernels.flash_attention
        print(json.dumps({"prefix": sys.prefix, "setuptools": setuptools.__version__,
                          "setuptools_file": setuptools.__file__,
                          "attention_is_function": inspect.isfunction(igpt_fast.kernels.attention),
                          "flash_attention": igpt_fast.kernels.flash_attention.__file__}))
        """)], cwd=tmp_path))
    assert os.path.samefile(found["prefix"], venv)
    assert int(found["setuptools"].split(".")[0]) >= 80, found  # as on the GPU machine (PEP 660 builds)
    assert os.path.dirname(os.path.dirname(found["setuptools_file"])) in site.getsitepackages(), found  # the base's
    assert found["attention_is_function"], found
    assert os.path.samefile(found["flash_attention"], source_copy / "kernels" / "flash_attention.py"), found
    usage = _run([venv / "bin" / "igpt-fast", "--help"], cwd=tmp_path)
    assert "Usage: igpt-fast" in usage and "train" in usage, usage


def test_wheel_holds_the_kernels_and_the_license(source_copy, tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", tmp_path / "dist", source_copy], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("igpt_fast-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert len(licenses) == 1, sorted(names)
        assert archive.read(licenses[0]) == (source_copy / "LICENSE").read_bytes()
    expected = ({f"igpt_fast/kernels/{m}.py" for m in KERNEL_MODULES}
                | {"igpt_fast/py.typed", "igpt_fast/kernels/defaults.py", "igpt_fast/kernels/defaults.json"})
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.startswith("kernels/")], sorted(names)


def _distribution_version(name):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(not (_distribution_version("kernels") and (_distribution_version("transformers") or "0")[0] >= "5"),
                    reason="needs transformers 5.x and Hugging Face's `kernels` package (constraints.txt has both)")
def test_repository_root_never_shadows_the_kernels_package(source_copy, tmp_path):
    """From the repository root, with Hugging Face's `kernels` installed: the editable install (whose
    build imports `kernels` through a setuptools entry point), transformers' ImageGPT, `make test`'s
    pytest collecting every test module, and the CLI all work, and `kernels` is never our folder."""
    venv = tmp_path / "venv"
    _run(["bash", "-c", 'source benchmarks/gpu_steps.sh && PY="$1" && gpu_venv "$2"', "bash", sys.executable, venv],
         cwd=source_copy)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], cwd=source_copy)
    found = json.loads(_run([python, "-c", textwrap.dedent("""
        import json
        import kernels, transformers
        transformers.ImageGPTForCausalImageModeling
        print(json.dumps({"kernels": kernels.__file__}))
        """)], cwd=source_copy))
    assert found["kernels"] and not os.path.samefile(os.path.dirname(found["kernels"]), source_copy / "kernels"), found
    collected = _run([python, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "tests"],
                     cwd=source_copy)
    modules = {os.path.basename(line.split("::")[0]) for line in collected.splitlines() if "::" in line}
    expected = {os.path.basename(p) for p in os.listdir(source_copy / "tests") if p.startswith("test_")}
    assert modules == expected, sorted(expected ^ modules)
    assert "error" not in collected.splitlines()[-1], collected[-2000:]
    usage = _run([venv / "bin" / "igpt-fast", "--help"], cwd=source_copy)
    assert "Usage: igpt-fast" in usage, usage
