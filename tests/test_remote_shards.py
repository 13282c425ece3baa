"""Shards over HTTP: a server on 127.0.0.1 (http.server in a thread, port 0) serves a tokenized
folder, with faults injected per file (a connection dropped mid-shard, a 404, a delay before the first
byte, a body that never ends, a huge Content-Length, bytes trickling in). Training and evaluation read
http:// shard specs; retries are bounded, backed off exponentially, restart a shard from its first
byte, and end in a DataError naming the URL; a shard is never read past its size bound nor past its
deadline, and its sha256 is checked."""
import http.server
import os
import threading
import time
from collections import Counter

import numpy as np
import pytest

from igpt_fast import shard as shard_mod
from igpt_fast.data import DataError, eval_loader, read_meta, train_loader
from igpt_fast.palette import Palette
from shards import write_meta, write_split

N_CTX = 16


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        name = self.path.lstrip("/")
        with server.lock:
            server.requests[name] += 1
            queue = server.faults.get(name, [])
            fault = queue.pop(0) if queue else None
        path = os.path.join(server.root, name)
        if fault == "404" or not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, "rb") as f:
            body = f.read()
        if fault == "slow":
            time.sleep(server.delay)
        try:
            if fault in ("endless", "huge", "trickle"):
                self._bad_body(fault, body)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if fault == "drop" else body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (timeout tests)
            pass
        self.close_connection = True  # after a "drop", half the body and the connection closes

    def _bad_body(self, fault, body):
        """endless: no Content-Length, zeros for up to 64 MiB; huge: a Content-Length of 1 TB; trickle: the
        body a byte every 20 ms for at most 3 s, then the connection closes."""
        self.send_response(200)
        if fault != "endless":
            self.send_header("Content-Length", str(10 ** 12 if fault == "huge" else len(body)))
        self.end_headers()
        if fault == "endless":
            for _ in range(64):
                self.wfile.write(bytes(1 << 20))
        elif fault == "trickle":
            t0 = time.monotonic()
            for i in range(len(body)):
                if time.monotonic() - t0 > 3:
                    break
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(0.02)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(root, faults={file: [fault, ...]}, delay=s) -> (base URL, server); each request of a file
    takes the next fault of its list ("drop", "404", "slow"); server.requests counts requests per file."""
    servers = []

    def start(root, faults=None, delay=0.0):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.root, server.faults, server.delay = str(root), dict(faults or {}), delay
        server.requests, server.lock = Counter(), threading.Lock()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(shard_mod, "FETCH_BACKOFF_S", 0.01)
    monkeypatch.setattr(shard_mod, "FETCH_TIMEOUT_S", 5.0)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _tokens(i):
    tokens = np.full(N_CTX, 3, dtype=np.uint16)
    tokens[0], tokens[1] = i % 512, i // 512
    return tokens, i % 10


def _ids(batches):
    return [int(t[0]) + 512 * int(t[1]) for tokens, _ in batches for t in tokens]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train: 60 samples in 6 shards; val: 40 samples in 4 shards; sample i has id i."""
    root = tmp_path_factory.mktemp("remote")
    splits = {split: write_split(str(root), split, (_tokens(i) for i in range(n)), 10)
              for split, n in (("train", 60), ("val", 40))}
    write_meta(str(root), Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3))), 4, splits)
    return root


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_train_and_eval_from_http(shards, serve):
    url, server = serve(shards)
    train_spec, val_spec = f"{url}/train-{{000000..000005}}.tar", f"{url}/val-{{000000..000003}}.tar"
    assert read_meta(train_spec)["n_ctx"] == N_CTX  # meta.json beside the shards
    assert sorted(_ids(eval_loader(val_spec, "val", 7))) == list(range(40))
    remote = _ids(_take(train_loader(train_spec, 8, seed=2), 12))
    assert remote == _ids(_take(train_loader(shards, 8, seed=2), 12))  # same order as the local folder
    resumed = _ids(_take(train_loader(train_spec, 8, seed=2, start_step=5, meta=shards / "meta.json"), 7))
    assert resumed == remote[5 * 8:]
    assert server.requests["meta.json"] == 3  # read_meta, eval_loader, the first train_loader


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2)])
def test_dropped_shard_is_read_again_from_the_start(shards, serve, world_size, num_workers):
    """A connection cut mid-shard: the shard is fetched again whole; its partial samples are never
    used, so evaluation still sees every sample exactly once."""
    url, server = serve(shards, faults={"val-000001.tar": ["drop"], "val-000002.tar": ["drop", "drop"]})
    seen = []
    for rank in range(world_size):
        seen += _ids(eval_loader(f"{url}/val-{{000000..000003}}.tar", "val", 6, rank=rank, world_size=world_size,
                                 num_workers=num_workers))
    assert sorted(seen) == list(range(40))
    assert server.requests["val-000001.tar"] == 2 and server.requests["val-000002.tar"] == 3


def test_retries_are_bounded_and_backed_off(shards, serve, monkeypatch):
    url, server = serve(shards, faults={"val-000001.tar": ["drop"] * 3})
    sleeps = []
    monkeypatch.setattr(shard_mod.time, "sleep", sleeps.append)
    with pytest.raises(DataError, match=r"cannot read http://127\.0\.0\.1:\d+/val-000001\.tar: IncompleteRead.*"
                                        r"\(3 of 3 tries\)"):
        list(eval_loader(f"{url}/val-{{000000..000003}}.tar", "val", 6))
    assert server.requests["val-000001.tar"] == 3
    assert sleeps == [0.01, 0.02]


def test_missing_shard_is_not_retried(shards, serve):
    url, server = serve(shards)
    with pytest.raises(DataError, match=r"cannot read http://127\.0\.0\.1:\d+/val-000004\.tar: HTTP 404 .*"
                                        r"\(1 of 3 tries\)"):
        list(eval_loader(f"{url}/val-{{000000..000004}}.tar", "val", 6, meta=shards / "meta.json"))
    assert server.requests["val-000004.tar"] == 1
    with pytest.raises(DataError, match="meta.json: HTTP 404"):
        read_meta(f"{url}/nowhere/train-000000.tar")
    url, server = serve(shards, faults={"train-000003.tar": ["404"] * 3})
    loader = train_loader(f"{url}/train-{{000000..000005}}.tar", 8, on_bad_shard="skip", on_skip=lambda *a: None)
    assert 33 not in _ids(_take(loader, 12))  # ids 30..39 live in train-000003.tar
    assert list(loader.skipped) == [f"{url}/train-000003.tar"] and "HTTP 404" in loader.skipped[f"{url}/train-000003.tar"]


def test_slow_server(shards, serve, monkeypatch):
    url, server = serve(shards, faults={"val-000000.tar": ["slow"]}, delay=0.3)
    assert sorted(_ids(eval_loader(f"{url}/val-{{000000..000003}}.tar", "val", 6))) == list(range(40))
    monkeypatch.setattr(shard_mod, "FETCH_TIMEOUT_S", 0.1)
    url, server = serve(shards, faults={"val-000000.tar": ["slow"] * 3}, delay=0.5)
    with pytest.raises(DataError, match=r"val-000000\.tar: TimeoutError: timed out \(3 of 3 tries\)"):
        list(eval_loader(f"{url}/val-{{000000..000003}}.tar", "val", 6))
    url, server = serve(shards, faults={"val-000000.tar": ["slow"] * 2}, delay=0.5)
    assert sorted(_ids(eval_loader(f"{url}/val-{{000000..000003}}.tar", "val", 6))) == list(range(40))


def test_remote_shard_cut_on_a_member_boundary(shards, serve, tmp_path):
    """A server that holds a truncated shard (its bytes as stored: nothing to retry): an error for
    evaluation, the shard left out for training with on_bad_shard="skip"."""
    for name in os.listdir(shards):
        os.symlink(shards / name, tmp_path / name)
    data = (shards / "val-000002.tar").read_bytes()
    os.remove(tmp_path / "val-000002.tar")
    (tmp_path / "val-000002.tar").write_bytes(data[:3 * 4096])  # 3 whole samples (2 members of 2 KiB each)
    url, server = serve(tmp_path)
    with pytest.raises(DataError, match=r"val-000002\.tar is truncated or damaged"):
        list(eval_loader(f"{url}/val-{{000000..000003}}.tar", "val", 6))
    assert server.requests["val-000002.tar"] == 1


def _meta_without_digests(shards, tmp_path):
    import json

    meta = json.loads((shards / "meta.json").read_text())
    for entry in meta["splits"].values():
        del entry["files"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path / "meta.json"


def test_a_shard_is_never_read_past_its_size_bound(shards, serve, tmp_path, monkeypatch):
    """A body that never ends and a Content-Length of 1 TB stop at the size meta.json lists (or at
    IGPT_FAST_SHARD_MAX_BYTES where it lists none), without a retry."""
    url, server = serve(shards, faults={"val-000001.tar": ["endless"] * 3, "val-000002.tar": ["huge"] * 3})
    listed = (shards / "val-000001.tar").stat().st_size
    spec = f"{url}/val-{{000000..000003}}.tar"
    with pytest.raises(DataError, match=rf"cannot read {url}/val-000001\.tar: it sends more than the {listed} bytes "
                                        r"meta.json lists$"):
        list(eval_loader(spec, "val", 40))
    with pytest.raises(DataError, match=rf"val-000002\.tar: its Content-Length 1000000000000 is more than the "
                                        rf"{listed} bytes meta.json lists$"):
        list(eval_loader(f"{url}/val-000002.tar", "val", 40, meta=shards / "meta.json"))
    assert server.requests["val-000001.tar"] == 1 and server.requests["val-000002.tar"] == 1
    monkeypatch.setenv("IGPT_FAST_SHARD_MAX_BYTES", "60000")
    with pytest.raises(DataError, match=r"val-000001\.tar: it sends more than 60000 bytes "
                                        r"\(IGPT_FAST_SHARD_MAX_BYTES\)"):
        list(eval_loader(spec, "val", 40, meta=_meta_without_digests(shards, tmp_path)))
    monkeypatch.setenv("IGPT_FAST_SHARD_MAX_BYTES", "lots")
    with pytest.raises(DataError, match="IGPT_FAST_SHARD_MAX_BYTES='lots' is not a positive number"):
        eval_loader(spec, "val", 40, meta=shards / "meta.json")


def test_a_shard_that_trickles_in_is_cut_off_at_its_deadline(shards, serve, monkeypatch):
    url, server = serve(shards, faults={"val-000001.tar": ["trickle"] * 3})
    monkeypatch.setenv("IGPT_FAST_SHARD_DEADLINE_S", "0.5")
    t0 = time.monotonic()
    with pytest.raises(DataError, match=rf"cannot read {url}/val-000001\.tar: not read within its deadline of 0\.5 s "
                                        r"\(IGPT_FAST_SHARD_DEADLINE_S; 1 of 3 tries\)"):
        list(eval_loader(f"{url}/val-{{000000..000003}}.tar", "val", 40))
    assert time.monotonic() - t0 < 2.5 and server.requests["val-000001.tar"] == 1


def test_a_remote_shard_that_differs_from_meta_fails_its_sha256(shards, serve, tmp_path):
    for name in os.listdir(shards):
        os.symlink(shards / name, tmp_path / name)
    import tarfile

    with tarfile.open(shards / "val-000002.tar") as tar:
        offset = tar.getmember("val00021.tokens.npy").offset_data + 128 + 2 * 5  # token 5: 3 -> 2, still valid
    data = bytearray((shards / "val-000002.tar").read_bytes())
    data[offset] ^= 1
    os.remove(tmp_path / "val-000002.tar")
    (tmp_path / "val-000002.tar").write_bytes(bytes(data))
    url, server = serve(tmp_path)
    with pytest.raises(DataError, match=rf"shard {url}/val-000002\.tar does not match meta.json: its sha256"):
        list(eval_loader(f"{url}/val-{{000000..000003}}.tar", "val", 6))
