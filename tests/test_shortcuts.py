"""Shortcut tests (gte.shortcuts, gte.shortcut_eval, ``gte eval --shortcut``, ``gte data shortcut``): transforms
deterministic per (seed, key) with exactly known regions, the attribution share on a model that looks only at one
corner (closed-form oracle), the CLI on tiny shards, mixed-rand backgrounds on shards with boxes, biased splits."""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from _fixtures import one_line_exit_2, run_main, write_jpeg_shards
from gte.models import ModelInfo
from gte.shortcut_eval import shortcut_batch, shortcut_metrics
from gte.shortcuts import parse_shortcut, unit

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ["a/0", "b/1", "c/2", "d/3"]


def _images(n: int = 4, h: int = 24, w: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 3, h, w), dtype=np.float32))


@pytest.mark.parametrize("text", ["patch", "patch:corner=random,size=0.3,color=00ff00", "watermark",
                                  "watermark:place=imagenet-w,opacity=0.8,text=gte"])
def test_transform_is_deterministic_per_seed_and_key_and_changes_exactly_its_region(text):
    x = _images()
    sc = parse_shortcut(text, seed=3)
    a, b = sc(x, KEYS), sc(x, KEYS)
    assert torch.equal(a.images, b.images) and torch.equal(a.mask, b.mask) and a.used.all()
    # one sample alone, or in another batch order, is shifted the same way: only (seed, key) decide
    alone = sc(x[2:3], KEYS[2:3])
    assert torch.equal(alone.images[0], a.images[2]) and torch.equal(alone.mask[0], a.mask[2])
    # on black images every pixel of the region changes (the pattern's colour is not black) and nothing else does
    black = sc(torch.zeros_like(x), KEYS)
    assert torch.equal((black.images != 0).any(1), black.mask)
    assert a.mask.any(dim=(1, 2)).all()
    assert torch.equal(a.images[~a.mask[:, None].expand_as(x)], x[~a.mask[:, None].expand_as(x)])


def test_patch_geometry_and_random_places_follow_the_seed():
    x = torch.zeros(2, 3, 16, 20)
    m = parse_shortcut("patch:size=0.25,corner=top-right")(x, KEYS[:2]).mask[0]
    expected = torch.zeros(16, 20, dtype=torch.bool)
    expected[:4, 16:] = True  # side round(0.25·16) = 4 at the top right
    assert torch.equal(m, expected)
    keys = [f"k{i}" for i in range(16)]
    x = torch.zeros(16, 3, 64, 64)
    places = [parse_shortcut("watermark", seed=s)(x, keys).mask for s in (0, 1)]
    assert not torch.equal(places[0], places[1])  # another seed, other places
    assert len({tuple(m.nonzero()[0].tolist()) for m in places[0]}) > 4  # per key, not one place for all


def test_background_mixed_rand_keeps_the_object_and_takes_another_background():
    x = _images(3, 16, 16)
    boxes = [[[2, 2, 8, 8]], [], [[6, 4, 14, 12]]]
    sc = parse_shortcut("background", seed=1)
    r = sc(x, KEYS[:3], boxes)
    assert r.used.tolist() == [True, False, True]  # the sample without boxes is left out
    assert torch.equal(sc(x, KEYS[:3], boxes).images, r.images)
    for i, j in ((0, 2), (2, 0)):  # two samples with boxes: each takes the other's background
        obj = ~r.mask[i]
        assert torch.equal(r.images[i][:, obj], x[i][:, obj])  # the object is its own pixels
        y0, y1, x0, x1 = ((4, 12, 6, 14) if j == 2 else (2, 8, 2, 8))
        outside = torch.ones(16, 16, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        keep = r.mask[i] & outside  # j's background where j's object was not: j's pixels as they are
        assert torch.equal(r.images[i][:, keep], x[j][:, keep])
    black = parse_shortcut("background:fill=black", seed=1)(x, KEYS[:3], boxes)
    assert torch.equal(black.images[0][:, 4:8, 8:14], torch.zeros(3, 4, 6))  # j's object region blanked
    assert torch.equal(r.images[1], x[1])


class Corner(nn.Module):
    """A B-cos-style linear "model" on [x, 1 − x]: class 0 = 0.2 · Σ green over the image, class 1 = Σ (red + blue)
    over the top-left K×K corner. W(x) is the weight itself, so its explanation of class 1 lies in the corner only."""

    K = 4

    def __init__(self, side: int = 16):
        super().__init__()
        w = torch.zeros(2, 6, side, side)
        w[0, 1] = 0.2
        w[1, [0, 2], : self.K, : self.K] = 1.0
        self.w = nn.Parameter(w)
        self.gte_info = ModelInfo("corner", 2, True, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,kchw->nk", x, self.w)


def _run(text: str, x: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> dict:
    sums: dict = defaultdict(float)
    sc = parse_shortcut(text)
    shortcut_batch(sums, [sc], [("s", Corner(), 0)], x, {"key": KEYS[: len(x)]}, labels, classes, "bcos")
    return shortcut_metrics(sums, [sc], False, 2, "test")[text]


def test_attribution_share_on_a_model_that_looks_only_at_one_corner():
    x = torch.full((2, 3, 16, 16), 0.2)
    ones, zeros = torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    # the patch covers the corner exactly: all of class 1's evidence is on it
    assert _run("patch:size=0.25,corner=top-left", x, ones, zeros)["student"]["pattern_share"] == pytest.approx(1.0)
    # elsewhere: none of it
    assert _run("patch:size=0.25,corner=bottom-right", x, ones, zeros)["student"]["pattern_share"] == 0.0
    # a 2×2 magenta patch inside the 4×4 corner: red + blue = 2 per patch pixel, 0.2 + 0.2 on the rest of the corner
    p, k = 2, Corner.K
    oracle = 2 * p * p / (2 * p * p + 0.4 * (k * k - p * p))
    r = _run("patch:size=0.125,corner=top-left", x, ones, zeros)
    assert r["student"]["pattern_share"] == pytest.approx(oracle, rel=1e-6)
    assert r["pattern_area"] == pytest.approx(4 / 256)
    assert r["student"]["explanation_cosine"] == pytest.approx(1.0)  # W(x) of a linear model does not move


def test_accuracy_change_known_answers():
    # clean: class 0 (0.2·0.2·256 = 10.24) beats class 1 (0.4·16 = 6.4); the top-left patch makes class 1 win (32)
    x = torch.full((2, 3, 16, 16), 0.2)
    zeros = torch.zeros(2, dtype=torch.long)
    hit = _run("patch:size=0.25,corner=top-left", x, zeros, zeros)["student"]
    assert (hit["acc_clean"], hit["acc_shifted"], hit["acc_change"]) == (1.0, 0.0, -1.0)
    miss = _run("patch:size=0.25,corner=bottom-right", x, zeros, zeros)["student"]
    assert (miss["acc_clean"], miss["acc_shifted"]) == (1.0, 1.0)


class Carton(nn.Module):
    """1000 classes on [x, 1 − x]: class 0 = 0.001 · Σ (1 − red) everywhere, class 478 ("carton") = Σ red over the
    bottom-right 4×4 corner. Black images are class 0; a red-bearing patch there makes them cartons."""

    def __init__(self):
        super().__init__()
        w = torch.zeros(1000, 6, 16, 16)
        w[0, 3] = 0.001
        w[478, 0, -4:, -4:] = 1.0
        self.w = nn.Parameter(w)
        self.gte_info = ModelInfo("carton", 1000, True, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,kchw->nk", x, self.w)


def test_carton_rate_on_1000_class_models():
    sums: dict = defaultdict(float)
    sc = parse_shortcut("patch:size=0.25")  # magenta (red 1) at the bottom right
    x, zeros = torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)
    shortcut_batch(sums, [sc], [("s", Carton(), 0)], x, {"key": KEYS[:2]}, zeros, zeros, "bcos")
    r = shortcut_metrics(sums, [sc], False, 1000, "test")["patch:size=0.25"]["student"]
    assert (r["carton_clean"], r["carton_shifted"], r["acc_change"]) == (0.0, 1.0, -1.0)


def test_eval_shortcut_patch_and_watermark_cli(tmp_path, teacher_path, monkeypatch, capsys):
    spec, _ = write_jpeg_shards(tmp_path / "d", [6])
    code, out, err = run_main(["eval", str(teacher_path), "--data", spec, "--teacher", str(teacher_path),
                               "--shortcut", "patch", "--shortcut", "watermark:opacity=0.7", "--json", "-"],
                              monkeypatch, capsys)
    assert code == 0, err
    m = json.loads(out)["shortcuts"]
    assert list(m) == ["patch", "watermark:opacity=0.7"]
    for r in m.values():
        assert r["n"] == 6 and r["skipped"] == 0 and r["seed"] == 0
        s, t = r["student"], r["teacher"]
        assert s == t  # the same model as student and teacher: the same numbers
        assert s["acc_clean"] == pytest.approx(json.loads(out)["acc1"])
        assert s["acc_change"] == pytest.approx(s["acc_shifted"] - s["acc_clean"])
        assert 0 < r["pattern_area"] < 1 and 0 <= s["pattern_share"] <= 1 and -1 <= s["explanation_cosine"] <= 1
        assert r["agreement_clean"] == r["agreement_shifted"] == 1.0
        assert "carton_clean" not in s  # a 4-class model: ImageNet's carton rate makes no sense
    assert m["watermark:opacity=0.7"]["options"]["opacity"] == 0.7
    code, out, err = run_main(["eval", str(teacher_path), "--data", spec, "--shortcut", "patch", "--json", "-",
                               "--shortcut-samples", "4", "--batch-size", "3"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["shortcuts"]["patch"]["n"] == 4  # 3 + the first of the second batch


@pytest.mark.parametrize("argv,needle", [
    (["--shortcut", "watermrk"], "unknown shortcut 'watermrk' (known: watermark, patch, background); did you mean "
                                 "watermark?"),
    (["--shortcut", "patch:corner=top"], "corner must be one of"),
    (["--shortcut", "patch:sise=0.2"], "has no option 'sise'"),
    (["--shortcut", "patch:size=2"], "size must be in (0, 1]"),
    (["--shortcut", "patch:color=nocolour"], "'nocolour' is not a colour"),
    (["--shortcut", "patch", "--shortcut", "patch"], "--shortcut patch is given twice"),
    (["--shortcut", "watermark:text= "], "PIL's default font draws nothing for it"),
    (["--shortcut", "watermark:text=[/]"], "text may not contain"),
])
def test_bad_shortcut_is_one_line_exit_2(argv, needle, tmp_path, teacher_path, monkeypatch, capsys):
    one_line_exit_2(["eval", str(teacher_path), "--data", str(tmp_path / "none.tar"), *argv], monkeypatch, capsys,
                    needle)


def _box_shards(directory, boxes_of):
    """Shards whose sample i carries ``boxes_of(i)`` (None: no json boxes)."""
    from gte.data.writers.core import atomic_tar

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with atomic_tar(directory / "b-000000.tar") as sink:
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
            meta = {"boxes": boxes_of(i)} if boxes_of(i) is not None else {}
            sink.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "cls": str(i % 4).encode(),
                        "json": json.dumps(meta).encode()})
    return str(directory / "b-000000.tar")


def test_eval_shortcut_background_on_shards_with_boxes(tmp_path, teacher_path, monkeypatch, capsys):
    spec = _box_shards(tmp_path / "boxes", lambda i: [[4, 4, 20, 24]] if i != 3 else None)
    code, out, err = run_main(["eval", str(teacher_path), "--data", spec, "--shortcut", "background", "--json", "-",
                               "--image-size", "32", "--eval-resize", "32"],
                              monkeypatch, capsys)
    assert code == 0, err
    r = json.loads(out)["shortcuts"]["background"]
    assert (r["n"], r["skipped"]) == (5, 1)  # the sample without boxes is skipped and counted
    s = r["student"]
    assert s["background_gap"] == pytest.approx(s["acc_clean"] - s["acc_shifted"])
    assert r["pattern_area"] == pytest.approx(1 - 16 * 20 / 32 / 32)
    one_line_exit_2(["eval", str(teacher_path), "--data", spec, "--shortcut", "background", "--batch-size", "1"],
                    monkeypatch, capsys, "5 samples have json.boxes but none found a partner", "--batch-size 2")
    bare = _box_shards(tmp_path / "bare", lambda i: None)
    one_line_exit_2(["eval", str(teacher_path), "--data", bare, "--shortcut", "background"], monkeypatch, capsys,
                    "--shortcut background: no sample has json.boxes", "6 samples skipped")


def _members(spec_dir):
    out = {}
    for path in sorted(spec_dir.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_data_shortcut_patch_marks_only_the_class(tmp_path, monkeypatch, capsys):
    spec, keys = write_jpeg_shards(tmp_path / "src", [5, 7], width=32, height=24)
    out = tmp_path / "biased"
    code, _, err = run_main(["data", "shortcut", "patch:size=0.25,color=ff0000", spec, "--out", str(out),
                             "--class", "1", "--share", "0.5", "--seed", "7"], monkeypatch, capsys)
    assert code == 0, err
    dst = _members(out)
    src = {}
    for path in sorted((tmp_path / "src").glob("data-*.tar")):
        with tarfile.open(path) as t:
            src.update({m.name: t.extractfile(m).read() for m in t.getmembers()})
    marked = [k for i, k in enumerate(keys) if i % 4 == 1 and unit(7, "select", k) < 0.5]
    assert 0 < len(marked) < 3  # of the 3 samples of class 1: some, not all
    assert json.loads((out / "shortcut.json").read_text())["patched"] == marked
    assert json.loads((out / "shards.json").read_text())["shards"]["train-000000.tar"]["groups"] == {"0": 6, "1": 6}
    assert sorted(dst) == sorted(keys)
    for i, k in enumerate(keys):
        if k in marked:
            image = np.asarray(Image.open(io.BytesIO(dst[k]["png"])))
            assert "jpg" not in dst[k]
            assert (image[-6:, -6:] == [255, 0, 0]).all()  # side round(0.25·24) = 6, bottom right
            original = np.asarray(Image.open(io.BytesIO(src[f"{k}.jpg"])).convert("RGB"))
            assert np.array_equal(image[:-6], original[:-6]) and np.array_equal(image[:, :-6], original[:, :-6])
        else:  # every other sample copied byte for byte
            assert dst[k]["jpg"] == src[f"{k}.jpg"] and dst[k]["cls"] == src[f"{k}.cls"]
    for argv, needle in ((["background", spec, "--class", "1"], "gte data shortcut makes patch or watermark splits"),
                         (["patch", spec, "--class", "9"], "no sample of class 9 in"),
                         (["patch", spec, "--class", "1", "--share", "0"], "--share must be in (0, 1], got 0.0"),
                         (["patch", spec, "--class", "1", "--seed", "8"], "holds 'train' shards of a different")):
        one_line_exit_2(["data", "shortcut", *argv, "--out", str(out)], monkeypatch, capsys, needle)
