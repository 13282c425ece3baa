"""The shape of the package: no import cycles among igpt_fast's modules (every import counted, the lazy
ones inside functions included, read with ast so nothing is imported), every IGPTError subclass defined
in errors.py, the CLI importable without torch, and meta.json read once per command (train, finetune,
probe, sample run in-process through click's CliRunner with the one reader, data.read_meta, counting
its calls)."""
import ast
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import igpt_fast
from igpt_fast import data as data_mod
from igpt_fast.cli import cli
from igpt_fast.palette import Palette
from shards import write_meta, write_split

PACKAGE = os.path.dirname(igpt_fast.__file__)
N_PX, N_VOCAB = 4, 16


def module_files():
    """{module name: path} of every .py file under igpt_fast/."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(PACKAGE))[:-3].split(os.sep)
                found[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, name)
    return found


def imports_of(module, path, known):
    """The igpt_fast modules `module` imports anywhere in its file (relative imports resolved)."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from .x import y: relative to the importing package
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {t for t in targets if t in known and t != module}


def test_no_import_cycles():
    known = module_files()
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    cycles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    assert "igpt_fast.cli" not in graph["igpt_fast.demo"]


def test_every_error_class_is_defined_in_errors_py():
    """IGPTError's subclasses live in igpt_fast/errors.py (the modules that raise them re-export them)."""
    known = module_files()
    tree = ast.parse(open(known["igpt_fast.errors"]).read())
    error_names = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    elsewhere = []
    for module, path in sorted(known.items()):
        if module == "igpt_fast.errors":
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", None) for b in node.bases}
                if bases & error_names:
                    elsewhere.append(f"{module}.{node.name}")
    assert not elsewhere, elsewhere


def row_samples(n, rng):
    for i in range(n):
        label = i % 2
        yield (np.arange(N_PX * N_PX) * (label + 1) + rng.integers(0, 2)) % N_VOCAB, label


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    rng = np.random.default_rng(0)
    palette = Palette(rng.uniform(-1, 1, (N_VOCAB, 3)).astype(np.float32))
    splits = {s: write_split(out, s, row_samples(n, rng), 16) for s, n in (("train", 32), ("val", 16), ("test", 16))}
    write_meta(out, palette, N_PX, splits, class_names=["a", "b"])
    return out


@pytest.fixture
def meta_reads(monkeypatch):
    """The calls of data.read_meta (the one reader of meta.json) while the test runs."""
    calls, read = [], data_mod.read_meta

    def counting(*args, **kwargs):
        calls.append(args)
        return read(*args, **kwargs)

    monkeypatch.setattr(data_mod, "read_meta", counting)
    return calls


def test_each_command_reads_meta_json_once(dataset, tmp_path, meta_reads):
    run = str(tmp_path / "run")
    commands = {
        "train": ["train", "--data", dataset, "--out", run, "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                  "--steps", "2", "--batch-size", "4", "--eval-every", "0", "--eval-batches", "1"],
        "probe": ["probe", run, "--data", dataset, "--max-iter", "5", "--no-pixels"],
        "finetune": ["finetune", run, "--data", dataset, "--steps", "2", "--batch-size", "4", "--eval-every", "0",
                     "--eval-batches", "1", "--max-eval", "8"],
        "sample": ["sample", run, "--data", dataset, "--n-images", "2", "--samples-per-image", "1",
                   "--out", str(tmp_path / "samples")],
    }
    for verb, args in commands.items():
        meta_reads.clear()
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, (verb, res.output)
        assert len(meta_reads) == 1, (verb, meta_reads)


def test_cli_import_loads_no_torch():
    """`igpt-fast --help` stays instant: importing the CLI (options.py, run_config.py included) loads neither
    torch nor numpy; each verb imports what it needs when it runs."""
    code = "import sys, igpt_fast.cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
