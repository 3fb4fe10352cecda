"""Small data fixtures for the tests: real JPEG shards, corruption, truncation, tiny source trees."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from gte.data.writers.core import atomic_tar, shard_name, shard_spec
from gte.io import atomic_path


def photo(name: str) -> Image.Image:
    """A bundled photo: scikit-image's ``data.<name>()`` or scikit-learn's ``<name>.jpg``."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def jpeg_bytes(rng: np.random.Generator, width: int = 24, height: int = 20, quality: int = 90) -> bytes:
    a = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg_shards(directory: Path, sizes: list[int], *, prefix: str = "data", num_classes: int = 4,
                      seed: int = 0, width: int = 24, height: int = 20, key_format: str = "{i:06d}",
                      extra: dict[str, bytes] | None = None) -> tuple[str, list[str]]:
    """Shards ``prefix-000000.tar…`` with ``sizes[j]`` samples each (0 writes an empty, valid tar): ``jpg``,
    ``cls`` = i % num_classes, ``json`` {"group": i % 2}; returns (brace spec, keys in order)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys, i = [], 0
    for j, n in enumerate(sizes):
        with atomic_tar(directory / shard_name(prefix, j)) as sink:
            for _ in range(n):
                key = key_format.format(i=i)
                sample = {"__key__": key, "jpg": jpeg_bytes(rng, width, height), "cls": str(i % num_classes).encode(),
                          "json": json.dumps({"group": i % 2}).encode(), **(extra or {})}
                sink.write(sample)
                keys.append(key)
                i += 1
    return shard_spec(directory, prefix, len(sizes)), keys


def rewrite_tar(path: Path, change) -> None:
    """Rewrite a tar member by member: ``change(name, data) -> bytes | None`` (None keeps the member)."""
    path = Path(path)
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            data = tar.extractfile(m).read() if m.isfile() else b""
            new = change(m.name, data)
            members.append((m, data if new is None else new))
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def corrupt_images(path: Path, keys: set[str]) -> None:
    """Cut the image (jpg/png/webp) of each key in ``keys`` to its first third (a truncated image file)."""
    rewrite_tar(path, lambda name, data: data[: len(data) // 3] if name.rsplit(".", 1)[0] in keys
                and name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp") else None)


def truncate_tar(path: Path, *, inside_last: bool = True) -> None:
    """Cut a tar inside the data of its last member (``inside_last``) or right after its last member's data."""
    path = Path(path)
    with tarfile.open(path) as tar:
        last = [m for m in tar][-1]
    cut = last.offset_data + (last.size // 2 if inside_last else last.size)
    with open(path, "r+b") as f:
        f.truncate(cut)


def write_imagefolder(root: Path, layout: dict[str, int], *, seed: int = 0) -> None:
    """``root/<class>/img_<i>.jpg`` with ``layout[class]`` small JPEGs each."""
    rng = np.random.default_rng(seed)
    for cls, n in layout.items():
        d = Path(root) / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (d / f"img_{i}.jpg").write_bytes(jpeg_bytes(rng))


def unreadable_file(directory: Path) -> Path | None:
    """A file this process may not read: one of mode 000 in ``directory``; for root, whom file modes do not stop, a
    write-only kernel attribute (sysfs refuses every reader with EACCES); None when there is none."""
    if os.geteuid() != 0:
        path = Path(directory) / "locked-000000.tar"
        path.write_bytes(b"")
        path.chmod(0)
        return path
    for candidate in sorted(glob.glob("/sys/bus/*/uevent")):
        try:
            open(candidate, "rb").close()
        except PermissionError:
            return Path(candidate)
        except OSError:
            continue
    return None


HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, files: Path, commit: str = HF_COMMIT) -> Path:
    """Place ``files``' contents in the hub cache as huggingface_hub does: content-addressed blobs, a snapshot of
    relative symlinks to them, ``refs/main`` naming the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in files.iterdir():
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """``gte argv`` through the console-script entry point: (exit code, stdout, stderr)."""
    from gte.cli import main

    monkeypatch.setattr(sys, "argv", ["gte", *argv])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_exit_2(argv, monkeypatch, capsys, *needles: str) -> str:
    code, _, err = run_main(argv, monkeypatch, capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("gte: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
