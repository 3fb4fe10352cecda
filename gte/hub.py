"""The teacher catalog, its cache and verified downloads (``gte fetch-teachers``) — no model code here.

A download lands in ``DEST/<file>.part`` (resumed with an HTTP Range request when a partial file exists), its SHA-256
must start with the hex digits in the release file name (torch.hub's rule) before anything else happens, then the
caller's ``convert`` (``gte.models.convert_release``: weights-only load into the gte model, strict) writes
``DEST/<name>.safetensors`` with gte metadata. The ``.pth`` is deleted: the safetensors file holds the same tensors.
This is the only module of gte that uses the network; the model builder resolves catalog names through it.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from gte import __version__
from gte.errors import GteError
from gte.paths import gte_home

BCOS_BASE = "https://github.com/B-cos/B-cos-v2/releases/download/v0.0.1-weights"
TORCHVISION_BASE = "https://download.pytorch.org/models"
CHUNK = 1 << 20
TIMEOUT_S = 30.0  # connect and per-read timeout; a stalled read is retried (resumed), not waited on forever
MAX_STALLS = 3  # consecutive attempts that add no bytes before giving up
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.")  # torch.hub's convention: <name>-<sha256 prefix>.pth


@dataclass(frozen=True)
class Teacher:
    """One released checkpoint: the gte architecture it loads into, where it lives, what it scores."""

    name: str
    arch: str
    url: str
    acc1: float  # published ImageNet top-1 (%), shown by --list
    source: str
    mb: float = 0.0  # download size in MB (10^6 bytes): the weights' bytes, what a .pth file adds is < 0.1 %
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if not _HASH_IN_NAME.search(self.file):
            raise ValueError(f"{self.file}: the file name carries no SHA-256 prefix (<name>-<hex>.pth)")

    @property
    def file(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256(self) -> str:
        """The expected prefix of the file's SHA-256 (10 hex digits for B-cos v2, 8 for torchvision)."""
        m = _HASH_IN_NAME.search(self.file)
        assert m is not None
        return m.group(1)


def _bcos(name: str, arch: str, file: str, acc1: float, mb: float) -> Teacher:
    return Teacher(name, arch, f"{BCOS_BASE}/{file}", acc1, "B-cos v2", mb)


def _tv(name: str, file: str, acc1: float, mb: float) -> Teacher:
    return Teacher(name, name, f"{TORCHVISION_BASE}/{file}", acc1, "torchvision", mb)


# URLs from bcos.models.pretrained.URLS and torchvision's weight enums; accuracies from their model cards; sizes are
# the state dicts' bytes (tests/test_hub.py checks them against the built architectures).
# The B-cos simple ViT-S release is left out: gte.models cannot build that architecture yet.
CATALOG: dict[str, Teacher] = {t.name: t for t in (
    _bcos("bcos_resnet18", "bcos_resnet18", "resnet_18-68b4160fff.pth", 68.736, 46.8),
    _bcos("bcos_resnet34", "bcos_resnet34", "resnet_34-a63425a03e.pth", 72.284, 87.3),
    _bcos("bcos_resnet50", "bcos_resnet50", "resnet_50-ead259efe4.pth", 75.882, 102.4),
    _bcos("bcos_densenet121", "bcos_densenet121", "densenet_121-b8daf96afb.pth", 73.612, 32.1),
    _bcos("bcos_densenet169", "bcos_densenet169", "densenet_169-7037ee0604.pth", 75.186, 56.9),
    _bcos("bcos_vit_ti_patch16_224", "bcos_vit_ti_patch16_224", "bcos_simple_vit_ti_patch16_224-4b0824b1c1.pth",
          59.960, 23.2),
    _tv("resnet18", "resnet18-f37072fd.pth", 69.758, 46.8),  # IMAGENET1K_V1
    _tv("resnet34", "resnet34-b627a593.pth", 73.314, 87.3),  # IMAGENET1K_V1
    _tv("resnet50", "resnet50-11ad3fa6.pth", 80.858, 102.4),  # IMAGENET1K_V2
)}


def cache_dir() -> Path:
    """Where fetched teachers live: ``$GTE_HOME/teachers``."""
    return gte_home() / "teachers"


def cached_path(name: str, dest: str | Path | None = None) -> Path:
    """Where teacher ``name`` is (or would be) cached: ``DEST/<name>.safetensors``."""
    return (Path(dest) if dest is not None else cache_dir()) / f"{name}.safetensors"


def get(name: str) -> Teacher:
    """The catalog entry ``name``, or a one-line error naming close matches."""
    if name in CATALOG:
        return CATALOG[name]
    close = difflib.get_close_matches(name, CATALOG, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(CATALOG)}"
    raise GteError(f"unknown teacher '{name}'; {hint}")


def resolve(name_or_path: str) -> Path | None:
    """The cached ``.safetensors`` of a catalog name; None if it is no catalog name (so: a path).

    Raises GteError for a catalog name that has not been downloaded, saying how to get it.
    """
    if name_or_path not in CATALOG:
        return None
    path = cached_path(name_or_path)
    if not path.is_file():
        raise GteError(f"teacher '{name_or_path}' is not downloaded; run `gte fetch-teachers {name_or_path}`")
    return path


Convert = Callable[[Teacher, Path, Path, str], None]  # (entry, verified .pth, out .safetensors, its SHA-256)


def fetch(teacher: str | Teacher, convert: Convert, dest: str | Path | None = None, mirror: str | None = None,
          console: Console | None = None) -> Path:
    """Download (or copy from ``mirror``), verify and ``convert`` one teacher; return its cached ``.safetensors``.

    ``mirror`` is a URL prefix (the release file name is appended) or a local directory holding the release files.
    """
    t = teacher if isinstance(teacher, Teacher) else get(teacher)
    console = console or Console(stderr=True)
    dest = Path(dest) if dest is not None else cache_dir()
    out = cached_path(t.name, dest)
    if out.is_file():
        console.print(f"{t.name}: already cached at {out}")
        return out
    local = mirror is not None and "://" not in mirror
    src = Path(mirror).expanduser() / t.file if local else None
    if src is not None and not src.is_file():
        raise GteError(f"{t.name}: {t.file} is not in the mirror directory {mirror}")
    dest.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest, console, t.name):  # two fetches of one teacher never share a .part
        if out.is_file():  # the other process finished it while this one waited
            console.print(f"{t.name}: already cached at {out}")
            return out
        _fetch_verified(t, convert, dest / f"{t.file}.part", out, src, mirror, console)
    console.print(f"{t.name}: wrote {out} (the verified .pth was converted and deleted)")
    return out


def _fetch_verified(t: Teacher, convert: Convert, part: Path, out: Path, src: Path | None, mirror: str | None,
                    console: Console) -> None:
    if src is not None:
        console.print(f"{t.name}: copying {src}")
        shutil.copyfile(src, part)
    else:
        url = f"{mirror.rstrip('/')}/{t.file}" if mirror else t.url
        console.print(f"{t.name}: downloading {url}")
        download(url, part, console)
    # Nothing but the .part exists until the hash matches; after that it is deleted whatever happens.
    try:
        got = sha256_of(part)
        if not got.startswith(t.sha256):
            raise GteError(f"{t.name}: SHA-256 mismatch for {t.file}: expected {t.sha256}…, got "
                           f"{got[:len(t.sha256)]}… (download deleted; nothing was cached)")
        console.print(f"{t.name}: SHA-256 {got[:len(t.sha256)]}… verified")
        convert(t, part, out, got)
    finally:
        part.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(directory: Path, console: Console, name: str) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) on the cache directory itself: a second fetch into it waits for the first
    (no lock file is left behind, and none can be unlinked under a waiting process)."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"{name}: another gte process is fetching into {directory}; waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def download(url: str, part: Path, console: Console, timeout: float = TIMEOUT_S) -> None:
    """Fetch ``url`` into ``part``, resuming an existing partial file; retry while attempts make progress."""
    stalls = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            if _attempt(url, part, before, console, timeout):
                return
            err = "the connection closed early"
        except HTTPError as e:
            if e.code == 416 and before:  # the partial file already covers the whole range: let the hash decide
                return
            if e.code < 500:
                raise GteError(f"{url}: HTTP {e.code} {e.reason}") from None
            err = f"HTTP {e.code}"
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, refused connections, short reads
            err = str(getattr(e, "reason", None) or e) or type(e).__name__
        gained = (part.stat().st_size if part.exists() else 0) > before
        stalls = 0 if gained else stalls + 1
        if stalls >= MAX_STALLS:
            raise GteError(f"{url}: download failed ({err}); run the command again to resume")
        console.print(f"  {err}; retrying from byte {part.stat().st_size if part.exists() else 0}")
        time.sleep(stalls)  # no wait after an attempt that made progress


def _attempt(url: str, part: Path, have: int, console: Console, timeout: float) -> bool:
    """One request; True when the body arrived complete."""
    headers = {"User-Agent": f"gte/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with urlopen(Request(url, headers=headers), timeout=timeout) as r:
        status = getattr(r, "status", None) or 200
        # A 200 answer to a Range request is the whole file (the server ignores ranges): start again from 0.
        resumed = have > 0 and status == 206
        if resumed and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            part.unlink()  # a range we did not ask for: the next attempt starts from 0
            raise OSError(f"unexpected Content-Range {r.headers.get('Content-Range')!r}")
        if have and not resumed:
            have = 0
        length = r.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with open(part, "ab" if resumed else "wb") as f, _progress(console) as bar:
            task = bar.add_task(part.name.removesuffix(".part"), completed=have,
                                total=have + expected if expected is not None else None)
            # http.client returns b"" (no error) when a server closes early, so the count is checked below.
            while block := r.read(CHUNK):
                f.write(block)
                received += len(block)
                bar.update(task, advance=len(block))
    return expected is None or received >= expected


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("  {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)
