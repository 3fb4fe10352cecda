"""Few-shot subsets: exact N per class, disjoint held-out set, deterministic across runs, layouts and workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from gte.data.spec import expand_spec
from gte.data.writers.fewshot import fewshot, priority
from gte.errors import GteError

from _fixtures import write_jpeg_shards

CLASSES, PER_CLASS = 5, 12  # class 4 gets fewer samples below


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 58 samples written as 2 shards and as 5 uneven shards (different layout, same keys)."""
    root = tmp_path_factory.mktemp("fewshot-src")
    a = write_jpeg_shards(root / "a", [30, 28], num_classes=CLASSES, key_format="img{i:04d}")
    b = write_jpeg_shards(root / "b", [3, 20, 1, 24, 10], num_classes=CLASSES, key_format="img{i:04d}")
    assert a[1] == b[1]
    (root / "a" / "classes.json").write_text(json.dumps([f"c{i}" for i in range(CLASSES)]))
    return root / "a", root / "b", a[1]


def _samples(directory: Path, split: str) -> list[tuple[str, int]]:
    files = sorted(str(p) for p in directory.glob(f"{split}-*.tar"))
    return [(s["__key__"], int(s["cls"])) for s in wds.WebDataset(files, shardshuffle=False, empty_check=False)]


def _tar_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def test_exact_counts_disjoint_deterministic(tmp_path, sources):
    src_a, src_b, keys = sources
    n_per_class = Counter(i % CLASSES for i in range(len(keys)))  # 58 samples: classes 0-2 have 12, 3-4 have 11
    r = fewshot(str(src_a), tmp_path / "a1", shots=4, holdout=3, seed=42, max_samples=7, workers=1)
    train, val = _samples(tmp_path / "a1", "train"), _samples(tmp_path / "a1", "val")
    assert Counter(c for _, c in train) == {c: 4 for c in range(CLASSES)}  # exactly N per class
    assert Counter(c for _, c in val) == {c: 3 for c in range(CLASSES)}  # exactly M per class
    assert not {k for k, _ in train} & {k for k, _ in val}  # disjoint
    assert r.source_samples == 58 and r.train.shards == 3 and not r.short_classes
    assert json.loads((tmp_path / "a1" / "classes.json").read_text())[0] == "c0"
    manifest = json.loads((tmp_path / "a1" / "fewshot.json").read_text())
    assert manifest["keys"]["train"] == [k for k, _ in train] and "blake2b" in manifest["rule"]
    # the documented rule, recomputed independently
    for c in range(CLASSES):
        ranked = sorted((priority(42, k), k) for i, k in enumerate(keys) if i % CLASSES == c)
        assert [k for _, k in ranked[:3]] == sorted((k for k, cc in val if cc == c), key=lambda k: priority(42, k))
        assert {k for _, k in ranked[3:7]} == {k for k, cc in train if cc == c}
    # identical bytes: a second run, another worker count, another source layout
    fewshot(str(src_a), tmp_path / "a2", shots=4, holdout=3, seed=42, max_samples=7, workers=2)
    fewshot(str(src_b), tmp_path / "b1", shots=4, holdout=3, seed=42, max_samples=7, workers=2)
    assert _tar_bytes(tmp_path / "a1") == _tar_bytes(tmp_path / "a2") == _tar_bytes(tmp_path / "b1")
    # another seed selects differently; fewer shots give a nested subset with the same held-out set
    fewshot(str(src_b), tmp_path / "s7", shots=4, holdout=3, seed=7, max_samples=7)
    assert set(_samples(tmp_path / "s7", "train")) != set(train)
    fewshot(str(src_a), tmp_path / "n2", shots=2, holdout=3, seed=42, max_samples=100)
    assert set(_samples(tmp_path / "n2", "train")) < set(train)
    assert set(_samples(tmp_path / "n2", "val")) == set(val)
    # a class with too few samples is reported, its held-out part filled first
    short = fewshot(str(src_a), tmp_path / "short", shots=10, holdout=2, seed=42)
    assert short.short_classes == {3: 11, 4: 11}
    assert Counter(c for _, c in _samples(tmp_path / "short", "train"))[4] == n_per_class[4] - 2


def test_output_is_readable_by_the_loader_and_errors(tmp_path, sources):
    src_a, _, _ = sources
    fewshot(str(src_a), tmp_path / "o", shots=2, holdout=1, seed=1, max_samples=4)
    from gte.data.loader import make_loader

    got = [k for b in make_loader(str(tmp_path / "o" / "train-*.tar"), train=False, image_size=16, batch_size=4)
           for k in b["key"]]
    assert len(got) == 2 * CLASSES
    with pytest.raises(GteError, match="--shots"):
        fewshot(str(src_a), tmp_path / "x", shots=0)
    with pytest.raises(GteError, match="not found"):
        fewshot(str(src_a / "nope-{000000..000001}.tar"), tmp_path / "x", shots=1)


def test_cli(tmp_path, sources):
    src_a, _, _ = sources
    env = {**os.environ, "COLUMNS": "200", "GTE_HOME": str(tmp_path / "home")}
    res = subprocess.run([str(Path(sys.executable).parent / "gte"), "data", "fewshot", str(src_a), "--shots", "3",
                          "--holdout", "2", "--seed", "42", "--out", str(tmp_path / "cli"), "--workers", "1"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "per 1,000 shards" in res.stderr and "train:" in res.stderr
    assert len(expand_spec(str(tmp_path / "cli" / "train-*.tar"))) == 1
