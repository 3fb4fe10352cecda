"""Tests for the synthetic Waterbirds-like WebDataset generator (gte.data.synthetic)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from gte.data import synthetic

SIZE, K, SEED = 32, 4, 0
N = {"teacher": 240, "distill": 120, "test": 100}


def _read(spec: str) -> list[dict]:
    """Raw samples via plain WebDataset, decoded by hand to check the on-disk contract."""
    out = []
    for s in wds.WebDataset(spec, shardshuffle=False):
        meta = json.loads(s["json"].decode("utf-8"))
        out.append({"key": s["__key__"], "png": s["png"], "cls": int(s["cls"].decode("ascii")), **meta})
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("demo")
    specs = synthetic.write_demo_shards(
        out, n_teacher=N["teacher"], n_distill=N["distill"], n_test=N["test"], image_size=SIZE, num_classes=K, seed=SEED
    )
    return out, specs


@pytest.fixture(scope="module")
def samples(shards: tuple[Path, dict[str, str]]) -> dict[str, list[dict]]:
    return {split: _read(spec) for split, spec in shards[1].items()}


def test_layout_and_metadata_files(shards: tuple[Path, dict[str, str]]) -> None:
    out, specs = shards
    assert set(specs) == set(synthetic.SPLITS)
    assert specs["teacher"] == str(out / "teacher-000000.tar")
    assert json.loads((out / "classes.json").read_text()) == ["circle", "square", "triangle", "plus"]
    done = json.loads((out / "DONE.json").read_text())
    assert done["specs"] == specs and done["args"]["seed"] == SEED and done["args"]["n_test"] == N["test"]
    assert not list(out.glob("*.tmp"))


def test_counts_and_roundtrip(samples: dict[str, list[dict]]) -> None:
    for split, rows in samples.items():
        assert len(rows) == N[split]
        assert [r["key"] for r in rows] == [f"{i:06d}" for i in range(N[split])]
        # Labels balanced in every split.
        assert set(Counter(r["cls"] for r in rows).values()) == {N[split] // K}
        for r in rows:
            assert r["box_labels"] == [r["cls"]]
            assert r["group"] == int(r["place"] != r["cls"])
            (x0, y0, x1, y1), = r["boxes"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            side = max(x1 - x0, y1 - y0)
            assert 0.3 * SIZE <= side <= 0.65 * SIZE


def test_split_correlations(samples: dict[str, list[dict]]) -> None:
    assert all(r["group"] == 0 and r["place"] == r["cls"] for r in samples["distill"])

    test = samples["test"]
    assert sum(r["group"] for r in test) == N["test"] // 2
    for c in range(K):  # half/half within each class too (counts differ by at most 1)
        groups = [r["group"] for r in test if r["cls"] == c]
        assert abs(2 * sum(groups) - len(groups)) <= 1

    teacher = samples["teacher"]
    assert {r["place"] for r in teacher} == set(range(K))
    aligned = sum(r["group"] == 0 for r in teacher) / len(teacher)
    assert abs(aligned - 1 / K) < 0.1  # place independent of class


@pytest.mark.parametrize("split", synthetic.SPLITS)
def test_rerender_matches_shards(samples: dict[str, list[dict]], split: str) -> None:
    for r in samples[split][:40]:
        img, box = synthetic.render_sample(synthetic.image_rng(SEED, split, int(r["key"])), r["cls"], r["place"], SIZE, K)
        stored = Image.open(io.BytesIO(r["png"]))
        assert stored.format == "PNG" and stored.mode == "RGB" and stored.size == (SIZE, SIZE)
        assert np.array_equal(np.asarray(stored), np.asarray(img))
        assert r["boxes"] == [box]


def _object_mask(img: np.ndarray, box: list[float]) -> np.ndarray:
    """Pixels with the object's flat colour (the most common colour inside the box)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    crop = img[y0:y1, x0:x1].reshape(-1, 3)
    colours, counts = np.unique(crop, axis=0, return_counts=True)
    return np.all(img == colours[counts.argmax()], axis=-1)


@pytest.mark.parametrize("image_size", [16, 32, 64])
@pytest.mark.parametrize("num_classes", [2, 6])
def test_render_box_is_tight_and_object_contrasts(image_size: int, num_classes: int) -> None:
    rng = np.random.default_rng(123)
    for label in range(num_classes):
        for _ in range(10):
            place = int(rng.integers(num_classes))
            img_pil, box = synthetic.render_sample(rng, label, place, image_size, num_classes)
            img = np.asarray(img_pil).astype(np.float32)
            mask = _object_mask(np.asarray(img_pil), box)
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box
            bg = img[~mask]
            # Loose bound: the generator measures contrast against the whole background
            # before the object is pasted, here only the visible part is left.
            assert np.abs(img[mask][0] - bg.mean(0)).mean() >= 60
            # The background's stripe texture alone identifies the place: project the visible background
            # (grey, mean removed) on each place's stripe pattern; the place's own pattern carries the most energy.
            grey = img.mean(-1)
            grey = np.where(mask, 0.0, grey - grey[~mask].mean())
            energy = []
            for p in range(num_classes):
                sin_a, cos_a = synthetic._stripe_basis(p, image_size, num_classes)
                energy.append(np.hypot((grey * sin_a[..., 0]).sum(), (grey * cos_a[..., 0]).sum()))
            assert int(np.argmax(energy)) == place
            assert bg.std(0).max() > 3  # textured, not a flat colour


def test_render_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        synthetic.render_sample(rng, 0, 0, SIZE, 7)
    with pytest.raises(ValueError):
        synthetic.render_sample(rng, 4, 0, SIZE, 4)
    with pytest.raises(ValueError):
        synthetic.write_synthetic_split(Path("unused"), "val", 10)


def test_multi_shard_spec_and_determinism(tmp_path: Path) -> None:
    a = synthetic.write_synthetic_split(tmp_path / "a", "test", 50, seed=7, samples_per_shard=16)
    synthetic.write_synthetic_split(tmp_path / "b", "test", 50, seed=7, samples_per_shard=16)
    synthetic.write_synthetic_split(tmp_path / "c", "test", 50, seed=8, samples_per_shard=16)
    assert a == str(tmp_path / "a" / "test-{000000..000003}.tar")
    assert [r["key"] for r in _read(a)] == [f"{i:06d}" for i in range(50)]
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != "groups.json")
    assert files == [f"test-{i:06d}.tar" for i in range(4)]
    assert json.loads((tmp_path / "a" / "groups.json").read_text()) == ["aligned", "conflicting"]  # json.group 0, 1
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
        with tarfile.open(tmp_path / "a" / name) as tf:
            assert all(m.mtime == 0 for m in tf.getmembers())  # no wall-clock time embedded
    # Splits use independent streams: same seed, different split -> different data.
    d = synthetic.write_synthetic_split(tmp_path / "d", "distill", 16, seed=7, samples_per_shard=16)
    assert Path(d).read_bytes() != (tmp_path / "a" / "test-000000.tar").read_bytes()


def test_interrupted_write_leaves_no_partial_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic.render_sample
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> tuple[Image.Image, list[float]]:
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(synthetic, "render_sample", flaky)
    (tmp_path / "DONE.json").write_text("{}")  # stale marker from an earlier run
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_demo_shards(tmp_path, n_teacher=40, n_distill=8, n_test=8)
    # Shard 0 of teacher would need 40 samples: nothing final, nothing temporary, no DONE marker.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["groups.json"]  # written first, whole (atomic)


def test_colour_backgrounds_code_the_place_by_hue() -> None:
    """`demo.background = "colour"` (recipes/demo-colour.toml): the place is readable from the mean background colour
    alone (hue = place / k ± 0.03), while the default stripes leave the mean hue uninformative."""
    import colorsys

    def bg_hue(place: int, i: int, background: str) -> float:
        img, box = synthetic.render_sample(np.random.default_rng([7, place, i]), 0, place, 32, 4, background)
        a = np.asarray(img, dtype=np.float32)
        mask = np.ones(a.shape[:2], bool)
        x0, y0, x1, y1 = (int(v) for v in box)
        mask[y0:y1, x0:x1] = False  # background pixels only
        return colorsys.rgb_to_hsv(*(a[mask].mean(0) / 255.0))[0]

    for place in range(4):
        hues = [bg_hue(place, i, "colour") for i in range(8)]
        dist = [min(abs(h - place / 4), 1 - abs(h - place / 4)) for h in hues]  # circular hue distance
        assert max(dist) < 0.05, (place, hues)
    stripes = [bg_hue(0, i, "stripes") for i in range(8)]
    assert max(stripes) - min(stripes) > 0.3  # stripe backgrounds draw their hue at random
    with pytest.raises(ValueError, match="background"):
        synthetic.render_sample(np.random.default_rng(0), 0, 0, 32, 4, "plaid")
