"""Test helpers for the tokenizer's tests: image sources built the way the real ones are (CIFAR python
batches pickled as Python 2 wrote them, tars), shards read back, one-line CLI errors, the temporary
lookup-table cache the tokenizer and palette tests share, and `igpt-fast` run with its output piped to a
file (what a log file sees).

References: the CIFAR "python" batch layout (dict of data uint8 (N, 3072) in R, G, B planes, labels).
"""
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest


@pytest.fixture(scope="module", autouse=True)
def lut_cache(tmp_path_factory):
    """Persisted lookup tables go to a temporary folder, not the user's cache (subprocesses inherit it).
    A test module takes it with `from sources import lut_cache`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IGPT_FAST_CACHE_DIR", str(tmp_path_factory.mktemp("lut-cache")))
        yield


def random_palette(k=512, seed=0):
    from igpt_fast.palette import Palette

    return Palette(np.random.default_rng(seed).uniform(-1, 1, (k, 3)).astype(np.float32))


def png_bytes(image, **kw):
    """A PIL image as PNG file bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def read_shards(out, split):
    """All samples of a split: {key: (tokens, cls or None)}, from the tars as written."""
    samples = {}
    for name in sorted(os.listdir(out)):
        if name.startswith(split + "-") and name.endswith(".tar"):
            with tarfile.open(os.path.join(out, name)) as tf:
                for m in tf:
                    key, _, ext = m.name.partition(".")
                    data = tf.extractfile(m).read()
                    tokens, cls = samples.get(key, (None, None))
                    if ext == "tokens.npy":
                        tokens = np.load(io.BytesIO(data))
                    elif ext == "cls":
                        cls = int(data)
                    samples[key] = (tokens, cls)
    return samples


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (SHORT_BINSTRING / BINSTRING), as the original CIFAR batches are."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj):
    """Pickle protocol 2 with bytes as Python 2 str and numpy.core globals, like the original CIFAR files."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_cifar10(root, rng, n_train=(40, 30), n_test=25):
    """A cifar-10-batches-py folder of random images -> (class names, {file: (images (n, 32, 32, 3), labels)})."""
    root.mkdir()
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (root / "batches.meta").write_bytes(py2_pickle({b"label_names": names, b"num_vis": 3072,
                                                     b"num_cases_per_batch": 40}))
    images = {}
    for name, n in [(f"data_batch_{i + 1}", k) for i, k in enumerate(n_train)] + [("test_batch", n_test)]:
        hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        data = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # rows: 1024 R, 1024 G, 1024 B
        labels = rng.integers(0, 10, n).tolist()
        (root / name).write_bytes(py2_pickle({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                               b"filenames": [b"img_%d.png" % i for i in range(n)]}))
        images[name] = (hwc, labels)
    return [n.decode() for n in names], images


def tar_add(tf, name, data):
    """Add a member `name` holding `data` to an open tarfile."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def tree(path):
    """{relative path: bytes} of every file below path."""
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


def one_line_error(result):
    """A failed CliRunner result's one "Error: ..." line (no traceback, exactly one error line)."""
    assert result.exit_code != 0
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    return errors[0]


def run_piped(tmp_path, *args, progress_seconds=0, cwd=None):
    """`igpt-fast ARGS` in a subprocess (in cwd), stdout and stderr piped to one file, progress lines every
    `progress_seconds`: (exit status, the file's text)."""
    log = tmp_path / "out.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IGPT_FAST_PROGRESS_SECONDS": str(progress_seconds)}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "igpt_fast.cli", *map(str, args)], stdout=f, stderr=f, env=env,
                              cwd=cwd, timeout=300)
    return proc.returncode, log.read_text()
