"""``gte fetch-teachers`` against a real HTTP server on 127.0.0.1 serving checkpoints the tests create.

The catalog gets a small test entry (a ``cifar_resnet20`` state dict, ~1 MB) whose file name carries the real SHA-256
prefix, as the releases do; the server is reached through ``mirror=``. Nothing here touches the internet.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from rich.console import Console

from gte import hub
from gte.models import convert_release
from gte.errors import GteError
from gte.models import build_model, load_model


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    cut_first_after: int | None = None  # first response: full Content-Length, connection closed after N bytes
    ignore_range: bool = False


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        rng = self.headers.get("Range")
        state.requests.append((self.path, rng))
        data = state.files.get(self.path.rsplit("/", 1)[-1])
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not state.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.cut_first_after is not None and len(state.requests) == 1:
            body = body[:state.cut_first_after]  # then the handler returns and the socket is closed mid-file
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server():
    state = ServerState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}/mirror"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, bytes]:
    """A small real model and its ``torch.save``d state dict (what a release .pth is)."""
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 10).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return model, buf.getvalue()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GTE_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "teachers"


def entry(data: bytes, prefix: str | None = None) -> hub.Teacher:
    """A catalog entry for ``data``; ``prefix`` overrides the (correct) SHA-256 prefix in the file name."""
    prefix = prefix or hashlib.sha256(data).hexdigest()[:10]
    # The catalog URL is unreachable on purpose: every test goes through the mirror.
    return hub.Teacher("tiny", "cifar_resnet20", f"http://0.0.0.0:9/never/tiny-{prefix}.pth", 91.0, "test",
                            num_classes=10)


def quiet() -> Console:
    return Console(file=io.StringIO())


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_fetch_verifies_converts_and_caches(server, tiny, home, monkeypatch):
    state, url = server
    model, data = tiny
    t = entry(data)
    monkeypatch.setitem(hub.CATALOG, t.name, t)
    state.files[t.file] = data
    out = hub.fetch("tiny", convert_release, mirror=url, console=quiet())
    assert out == home / "tiny.safetensors" and sorted(p.name for p in home.iterdir()) == ["tiny.safetensors"]
    assert state.requests == [(f"/mirror/{t.file}", None)]
    assert hub.resolve("tiny") == out
    loaded = load_model("tiny")  # by catalog name
    assert same_outputs(model, loaded)
    assert same_outputs(model, build_model("cifar_resnet20", 10, weights="tiny"))
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["teacher"] == "tiny" and meta["arch"] == "cifar_resnet20" and meta["source_sha256"].startswith(t.sha256)
    log = Console(file=io.StringIO())
    assert hub.fetch("tiny", convert_release, mirror=url, console=log) == out  # cached: no second download
    assert len(state.requests) == 1 and "already cached" in log.file.getvalue()


def test_hash_mismatch_is_refused_and_leaves_nothing(server, tiny, home):
    state, url = server
    _, data = tiny
    real = hashlib.sha256(data).hexdigest()
    t = entry(data, prefix=("0" if real[0] != "0" else "1") * 10)
    state.files[t.file] = data
    with pytest.raises(GteError) as e:
        hub.fetch(t, convert_release, mirror=url, console=quiet())
    msg = str(e.value)
    assert "\n" not in msg and f"expected {t.sha256}" in msg and f"got {real[:10]}" in msg
    assert list(home.iterdir()) == []  # no .part, no .pth, no .safetensors


@pytest.mark.parametrize("ignore_range", [False, True], ids=["range-resume", "server-ignores-range"])
def test_resume_after_connection_cut(server, tiny, home, ignore_range):
    state, url = server
    model, data = tiny
    t = entry(data)
    state.files[t.file] = data
    state.cut_first_after, state.ignore_range = len(data) // 3, ignore_range
    out = hub.fetch(t, convert_release, mirror=url + "/", console=quiet())
    assert [r[1] for r in state.requests] == [None, f"bytes={len(data) // 3}-"]
    assert same_outputs(model, load_model(str(out)))
    assert sorted(p.name for p in home.iterdir()) == ["tiny.safetensors"]


def test_resume_of_partial_file_from_earlier_run(server, tiny, home):
    state, url = server
    model, data = tiny
    t = entry(data)
    state.files[t.file] = data
    home.mkdir(parents=True)
    (home / f"{t.file}.part").write_bytes(data[:1000])  # an interrupted earlier download
    out = hub.fetch(t, convert_release, mirror=url, console=quiet())
    assert state.requests == [(f"/mirror/{t.file}", "bytes=1000-")]
    assert same_outputs(model, load_model(str(out)))


def test_local_directory_mirror(tiny, tmp_path, home):
    model, data = tiny
    t = entry(data)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / t.file).write_bytes(data)
    out = hub.fetch(t, convert_release, mirror=str(mirror), console=quiet())
    assert same_outputs(model, load_model(str(out)))
    with pytest.raises(GteError, match="not in the mirror directory"):
        hub.fetch(replace(entry(data, prefix="ab" * 5), name="other"), convert_release, mirror=str(mirror),
                  console=quiet())


def test_http_404_is_one_clear_error(server, tiny, home):
    _, url = server
    with pytest.raises(GteError, match="HTTP 404"):
        hub.fetch(entry(tiny[1]), convert_release, mirror=url, console=quiet())


def test_catalog_names_sha_prefixes_and_models():
    from gte.models import REGISTRY

    assert {"bcos_densenet169", "bcos_resnet34", "resnet34"} <= set(hub.CATALOG)
    for t in hub.CATALOG.values():
        assert t.arch in REGISTRY and t.num_classes == 1000
        assert len(t.sha256) == (10 if t.source == "B-cos v2" else 8)
        assert t.url.endswith("/" + t.file)
    assert hub.CATALOG["bcos_resnet34"].sha256 == "a63425a03e"


def test_uncached_teacher_name_says_how_to_fetch(home):
    with pytest.raises(GteError, match=r"teacher 'bcos_resnet34' is not downloaded; run `gte fetch-teachers "
                                       r"bcos_resnet34`"):
        load_model("bcos_resnet34")
    with pytest.raises(GteError, match="not downloaded"):
        build_model("resnet18", 1000, weights="resnet18")


def _gte(args: list[str], home: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "GTE_DEBUG"}
    env.update(GTE_HOME=str(home), COLUMNS="200", NO_COLOR="1")
    return subprocess.Popen([sys.executable, "-m", "gte", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_cli_list_and_unknown_name(tmp_path):
    procs = [_gte(["fetch-teachers", "--list"], tmp_path), _gte(["fetch-teachers", "bcos_resnet43"], tmp_path)]
    (out, err0), (_, err) = (p.communicate(timeout=60) for p in procs)
    assert procs[0].returncode == 0, err0
    for name in ("bcos_densenet169", "bcos_resnet34", "resnet34", "72.28"):
        assert name in out
    assert " no " in out and "Traceback" not in err0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert procs[1].returncode == 2 and len(lines) == 1, err
    assert lines[0].startswith("gte: error: unknown teacher 'bcos_resnet43'") and "bcos_resnet34" in lines[0]
    assert not (tmp_path / "teachers").exists()  # nothing was created


@pytest.mark.parametrize("name", list(hub.CATALOG))
def test_catalog_sizes_are_the_architectures_weights(name):
    """``gte fetch-teachers --list`` shows each download's size: the built architecture's state-dict bytes (meta
    tensors: nothing allocated), to the shown 0.1 MB."""
    t = hub.CATALOG[name]
    with torch.device("meta"):
        model = build_model(t.arch, t.num_classes)
    size = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert abs(size / 1e6 - t.mb) <= 0.05, size
