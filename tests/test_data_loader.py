"""The shard loader: exact evaluation coverage over ranks × workers, equal training steps, bad data, no unpickling."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import subprocess
import sys
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from gte.data import index, plan
from gte.data.guard import DataWarning
from gte.data.index import scan_shard, shard_counts
from gte.data.loader import make_loader, steps_per_epoch
from gte.data.spec import expand_spec
from gte.data.transforms import SampleTransform, rrc_params, sample_rng
from gte.errors import GteError

from _fixtures import corrupt_images, photo, truncate_tar, write_jpeg_shards

SIZES = [23, 7, 31, 0, 12]  # uneven, one empty tar


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("GTE_HOME", str(tmp_path / "home"))  # shard-count cache per test


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    d = tmp_path_factory.mktemp("uneven")
    return write_jpeg_shards(d, SIZES, width=96, height=72)  # crops of ≥ 32 px: decoded at 1/2 or 1/4 for 8² outputs


def _keys(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


# ------------------------------------------------------------------------------------------------ plans (pure)


def _materialise(plans, counts):
    """(shard, index) of every sample each slot's pieces select."""
    out = []
    for pieces in plans:
        got = []
        for p in pieces:
            j = int(p.url)
            stop = counts[j] if p.stop is None else p.stop
            got += [(j, i) for i in range(p.start, stop) if i % p.stride == p.offset]
            assert p.size() is None or p.size() == len([i for i in range(p.start, stop) if i % p.stride == p.offset])
        out.append(got)
    return out


@pytest.mark.parametrize("counts", [[23, 7, 31, 0, 12], [5], [0, 3], [100, 1, 1, 1, 1, 1, 1, 50], [2, 2]])
@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 4), (8, 1)])
def test_eval_plans_partition_the_samples(counts, world, workers):
    urls = [str(j) for j in range(len(counts))]
    everything = sorted((j, i) for j, c in enumerate(counts) for i in range(c))
    for known in (counts, None):
        slots = _materialise(plan.eval_plan(urls, known, world, workers), counts)
        assert len(slots) == world * workers
        flat = [s for slot in slots for s in slot]
        assert sorted(flat) == everything  # every sample once: none lost, no duplicates
        if known is not None:  # counted: slot sizes within one sample
            sizes = [len(s) for s in slots]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("counts,world,workers,batch", [([23, 7, 31, 0, 12], 2, 2, 4), ([40] * 5, 3, 2, 8),
                                                        ([7, 9], 2, 3, 1), ([100], 4, 4, 2)])
def test_train_plans_equal_steps_and_disjoint_ranges(counts, world, workers, batch):
    urls = [str(j) for j in range(len(counts))]
    n = sum(counts)
    steps = plan.train_steps(n, batch, world)
    quotas = plan.train_quotas(steps, batch, world, workers)
    for r in range(world):  # every rank delivers steps · batch samples
        assert sum(quotas[r * workers:(r + 1) * workers]) == steps * batch
    for epoch in range(3):
        slots = _materialise(plan.train_plan(urls, counts, steps=steps, batch_size=batch, world_size=world,
                                             workers=workers, seed=1, epoch=epoch), counts)
        flat = [s for slot in slots for s in slot]
        assert len(flat) == len(set(flat)) == n  # ranges partition the data
        assert all(len(s) >= q for s, q in zip(slots, quotas))  # no slot needs to repeat when data is clean
    assert plan.epoch_order(10, 1, 0) != plan.epoch_order(10, 1, 1)  # new shard order every epoch


# ---------------------------------------------------------------------------------------------- single process


def test_counts_from_headers(uneven):
    spec, keys = uneven
    counts = shard_counts(expand_spec(spec))
    assert [c.n for c in counts] == SIZES and not any(c.truncated for c in counts)
    assert steps_per_epoch(spec, batch_size=8, world_size=2) == sum(SIZES) // 16


@pytest.mark.parametrize("world,workers", [(2, 0), (3, 2)])  # 3 × 2 slots > 4 non-empty shards
def test_eval_reads_everything_once_in_simulated_ranks(uneven, world, workers):
    spec, keys = uneven
    seen = []
    for rank in range(world):
        loader = make_loader(spec, train=False, image_size=16, batch_size=5, num_workers=workers,
                             world_size=world, rank=rank)
        got = _keys(loader)
        assert loader.batches <= len(loader)
        seen += got
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen))


def _pixels(batches) -> dict[str, torch.Tensor]:
    return {k: img for x in batches for k, img in zip(x["key"], x["image"])}


def test_train_epoch_is_exact_seeded_and_changes_per_epoch(uneven):
    """Same keys and the same pixels — reduced-scale decoding on — for a rerun, for other worker counts and ranks:
    a sample's crop is drawn from its own seed and the full-size dimensions, so the decode scale never moves it."""
    spec, keys = uneven
    n, b = len(keys), 8

    def epoch(e, workers=2, rank=0, world=1, reduced=True, margin=2.0):
        loader = make_loader(spec, train=True, image_size=8, batch_size=b, num_workers=workers, seed=3, epoch=e,
                             shuffle_buffer=20, world_size=world, rank=rank, reduced_decode=reduced,
                             decode_margin=margin)
        batches = list(loader)
        assert len(batches) == len(loader) == n // (b * world)
        assert all(x["image"].shape == (b, 3, 8, 8) for x in batches)
        return _pixels(batches)

    e0, e1 = epoch(0), epoch(1)
    assert len(e0) == (n // b) * b  # distinct samples: all but the < batch remainder
    again = epoch(0)
    assert list(again) == list(e0) and all(torch.equal(again[k], e0[k]) for k in e0)  # seeded, pixels too
    assert list(e0) != list(e1)  # and reshuffled per epoch
    two = [epoch(0, rank=r, world=2) for r in range(2)]
    assert len(two[0]) == len(two[1])  # same number of steps per rank
    assert not set(two[0]) & set(two[1])
    one_worker = epoch(0, workers=0)
    for other in (one_worker, *two):  # re-ranked, other worker counts: a shared key has the same pixels
        shared = set(other) & set(e0)
        assert shared and all(torch.equal(other[k], e0[k]) for k in shared)
    full = epoch(0, reduced=False)  # the switch off: same samples, and some pixels do move (reduction happened)
    assert list(full) == list(e0) and any(not torch.equal(full[k], e0[k]) for k in e0)
    coarse = epoch(0, margin=1.0)  # data.decode_margin reaches the workers' transforms: same samples, coarser scales
    assert list(coarse) == list(e0) and any(not torch.equal(coarse[k], e0[k]) for k in e0)


def test_resume_mid_epoch_continues_the_same_stream(uneven):
    spec, _ = uneven
    kw = dict(train=True, image_size=8, batch_size=4, num_workers=2, seed=5, epoch=2, shuffle_buffer=10)
    full = list(make_loader(spec, **kw))
    tail = list(make_loader(spec, start_batch=5, **kw))
    assert [b["key"] for b in tail] == [b["key"] for b in full[5:]]
    assert all(torch.equal(t["image"], f["image"]) for t, f in zip(tail, full[5:]))  # reduced-scale decode on


def test_images_boxes_and_groups(tmp_path):
    import numpy as np
    from PIL import Image

    # 40×20 image, box on the right half; eval: resize short side 20 → 10, centre crop 10 → x offset 5
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(buf, "PNG")
    sample = {"__key__": "k", "png": buf.getvalue(), "cls": b"3",
              "json": json.dumps({"group": 1, "boxes": [[20, 0, 40, 20]], "box_labels": [3], "labels": [3]}).encode()}
    out = SampleTransform(False, 10, eval_resize=10)(sample)
    assert out["image"].shape == (3, 10, 10) and out["label"] == 3 and out["group"] == 1
    assert out["boxes"] == [[5.0, 0.0, 10.0, 10.0]] and out["labels"] == [3] and out["box_labels"] == [3]
    tr = SampleTransform(True, 8, crop_scale=(1.0, 1.0), ratio=(2.0, 2.0), seed=0)(sample)
    x0, y0, x1, y1 = tr["boxes"][0]
    assert (y0, y1) == (0.0, 8.0) and x1 - x0 == pytest.approx(4.0)  # whole image kept, half of it is the box


def _encoded(image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _encoded_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_reduced_decode_moves_pixels_less_than_jpeg_encoding():
    """Real photos as quality-90 JPEGs, crops to 64² (those of ≥ 256 px decoded at 1/2 or 1/4): over the photos, the
    reduced-scale pixels are closer to the full-scale ones than the full-scale ones are to the photo's (lossless PNG)
    pixels, in max and in mean — reducing moves less than JPEG encoding already did (the figures:
    benchmarks/reduced_decode.py). Boxes and maps, defined on the full-size image, do not move."""
    reduced_err, jpeg_err = [], []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):  # scikit-image's: importing scikit-learn takes seconds
        img = photo(name)
        w, h = img.size
        box = [[w / 4, h / 4, w / 2, h]]
        jpg = {"jpg": _encoded(img, "JPEG", quality=90), "cls": b"0", "json": json.dumps({"boxes": box}).encode(),
               "map.npy": _encoded_npy(np.random.default_rng(0).random((1, 7, 7), dtype=np.float32))}
        png = {**jpg, "png": _encoded(img, "PNG", compress_level=0)}
        del png["jpg"]
        for train in (True, False):
            for key in map(str, range(6 if train else 1)):
                kw = dict(eval_resize=73, members=("map.npy",), maps=("map.npy",))
                full, reduced, lossless = (SampleTransform(train, 64, reduced_decode=r, **kw)({**d, "__key__": key})
                                           for d, r in ((jpg, False), (jpg, True), (png, False)))
                assert reduced["boxes"] == full["boxes"] and torch.equal(reduced["map.npy"], full["map.npy"])
                reduced_err.append((reduced["image"].int() - full["image"].int()).abs())
                jpeg_err.append((lossless["image"].int() - full["image"].int()).abs())
    reduced_err, jpeg_err = torch.stack(reduced_err).float(), torch.stack(jpeg_err).float()
    assert reduced_err.max() > 0  # the reduced scale was used
    assert reduced_err.max() <= jpeg_err.max() and reduced_err.mean() <= jpeg_err.mean()


def test_decode_margin_one_decodes_coarser_and_moves_pixels_about_as_far_as_jpeg_encoding():
    """``decode_margin=1`` picks the next coarser DCT scale for a crop that shrinks 3× (2 keeps it at full size), and
    over real photos its pixels move more than with the default margin, about as far as JPEG encoding moved them
    (64² crops here: mean 0.88 vs 0.64, max 28 vs 17 levels; the stated bound: ≤ 1.5× in mean, ≤ 2× in max)."""
    img = photo("coffee")
    data = _encoded(img, "JPEG", quality=90)
    assert SampleTransform(True, 64).decode(data, "jpg", shrink=3.0)[1] == 1.0
    assert SampleTransform(True, 64, decode_margin=1.0).decode(data, "jpg", shrink=3.0)[1] == 0.5
    errs: dict[str, list[torch.Tensor]] = {"m2": [], "m1": [], "jpeg": []}
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        img = photo(name)
        jpg = {"jpg": _encoded(img, "JPEG", quality=90), "cls": b"0"}
        png = {"png": _encoded(img, "PNG", compress_level=0), "cls": b"0"}
        for key in map(str, range(6)):
            full, m2, m1, lossless = (SampleTransform(True, 64, reduced_decode=r, decode_margin=m)({**d, "__key__": key})
                                      ["image"].int() for d, r, m in ((jpg, False, 2.0), (jpg, True, 2.0),
                                                                      (jpg, True, 1.0), (png, False, 2.0)))
            for k, x in (("m2", m2), ("m1", m1), ("jpeg", lossless)):
                errs[k].append((x - full).abs().float())
    m2, m1, jpeg = (torch.stack(errs[k]) for k in ("m2", "m1", "jpeg"))
    assert m1.mean() > m2.mean() and m1.max() >= m2.max()
    assert m1.max() <= 2 * jpeg.max() and m1.mean() <= 1.5 * jpeg.mean(), (m1.max(), jpeg.max(), m1.mean(), jpeg.mean())


def test_reduced_decode_off_gives_the_full_size_pixels():
    """``reduced_decode=False``: exactly torchvision's reference pipeline on the fully decoded image, written here
    with PIL — RandomResizedCrop(box drawn from the sample's generator) + flip, and Resize + CenterCrop."""
    from PIL import Image

    data = _encoded(photo("coffee"), "JPEG", quality=90)
    source = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = source.size
    for key in ("a", "b", "c"):
        rng = sample_rng(0, 0, 0, key)
        l, t, cw, ch = rrc_params(w, h, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        expected = source.resize((24, 24), Image.BILINEAR, box=(l, t, l + cw, t + ch))
        if rng.random() < 0.5:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        got = SampleTransform(True, 24, reduced_decode=False)({"__key__": key, "jpg": data, "cls": b"0"})["image"]
        assert torch.equal(got, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1))
    rw, rh = int(27 * w / h), 27  # short side (height) to 27, long side truncated; then the centre 24²
    dx, dy = round((rw - 24) / 2), round((rh - 24) / 2)
    expected = source.resize((rw, rh), Image.BILINEAR).crop((dx, dy, dx + 24, dy + 24))
    got = SampleTransform(False, 24, eval_resize=27, reduced_decode=False)({"__key__": "k", "jpg": data, "cls": b"0"})
    assert torch.equal(got["image"], torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1))


# --------------------------------------------------------------------------------------------------- bad data


def test_bad_data_is_skipped_counted_and_bounded(tmp_path):
    spec, keys = write_jpeg_shards(tmp_path, [90, 70, 100, 60, 81])  # 401 samples
    bad = {keys[95], keys[100], keys[265], keys[300]}  # 1 % of the 400 usable ones
    corrupt_images(tmp_path / "data-000001.tar", {keys[95], keys[100]})
    corrupt_images(tmp_path / "data-000003.tar", {keys[265], keys[300]})
    truncate_tar(tmp_path / "data-000004.tar")  # cuts the last sample
    (tmp_path / "data-000005.tar").write_bytes(b"")  # a 0-byte shard is harmless
    spec = str(tmp_path / "data-{000000..000005}.tar")
    assert scan_shard(str(tmp_path / "data-000004.tar")).truncated
    with pytest.warns(DataWarning, match="data-000004.tar"):
        loader = make_loader(spec, train=False, image_size=16, batch_size=16, num_workers=2)
    seen = _keys(loader)
    assert sorted(seen) == sorted(set(keys[:400]) - bad)
    assert loader.skipped == 4 and loader.stats()["bad_fraction"] == 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        train = make_loader(spec, train=True, image_size=16, batch_size=16, num_workers=2)
        assert len(list(train)) == 25 and train.skipped == 4  # 1 %: not more than the limit, training goes on
        corrupt_images(tmp_path / "data-000002.tar", set(keys[160:190]))  # now 34 of 400 (8.5 %)
        with pytest.raises(GteError, match=r"unreadable, more than data.max_bad_fraction = 1 %.*000\d+"):
            list(make_loader(spec, train=True, image_size=16, batch_size=16, num_workers=2))
        assert len(list(make_loader(spec, train=True, image_size=16, batch_size=16, max_bad_fraction=0.1))) == 25


def test_unexpected_truncation_while_reading(tmp_path):
    """A shard cut after it was counted (stale cache) ends with a warning; the missing samples count as skipped."""
    spec, keys = write_jpeg_shards(tmp_path, [20, 20])
    shard_counts(expand_spec(spec))  # counted while whole
    path = tmp_path / "data-000001.tar"
    with tarfile.open(path) as tar:
        cut = [m for m in tar][30].offset_data + 5  # inside sample 10 of that shard
    with open(path, "r+b") as f:
        f.truncate(cut)
    st = os.stat(path)
    index._mem_cache[(str(path), st.st_size, st.st_mtime_ns)] = index.ShardCount(20)  # a stale count
    with pytest.warns(DataWarning, match="truncated"):
        loader = make_loader(spec, train=False, image_size=16, batch_size=8, max_bad_fraction=1.0)
        seen = _keys(loader)
    assert sorted(seen) == sorted(keys[:30]) and loader.skipped == 10


def test_missing_and_empty_specs_fail_in_one_line(tmp_path):
    write_jpeg_shards(tmp_path, [3])
    with pytest.raises(GteError, match=r"shard file not found: \S*data-000001.tar$"):
        make_loader(str(tmp_path / "data-{000000..000001}.tar"), train=False, image_size=16, batch_size=2)
    with pytest.raises(GteError, match="matches no files"):
        expand_spec(str(tmp_path / "*.tgz"))
    assert expand_spec(str(tmp_path)) == [str(tmp_path / "data-000000.tar")]  # a directory: its *.tar
    (tmp_path / "z-000000.tar").write_bytes(b"")
    with pytest.raises(GteError, match="no samples"):
        make_loader(str(tmp_path / "z-000000.tar"), train=True, image_size=16, batch_size=2)


class _Bomb:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['GTE_BOMB']}",))


def test_pth_members_are_never_unpickled(tmp_path, monkeypatch):
    flag = tmp_path / "unpickled"
    monkeypatch.setenv("GTE_BOMB", str(flag))
    spec, keys = write_jpeg_shards(tmp_path, [6], extra={"logits.pth": pickle.dumps(_Bomb())})
    assert len(_keys(make_loader(spec, train=False, image_size=16, batch_size=4))) == 6
    assert len(_keys(make_loader(spec, train=True, image_size=16, batch_size=2, num_workers=2))) == 6
    assert not flag.exists()
    with pytest.raises(GteError, match="never"):
        make_loader(spec, train=False, image_size=16, batch_size=4, members=("logits.pth",))
    assert os.environ.get("WDS_PYTORCH_WEIGHTS_ONLY") == "1"
    # numeric members come back as tensors, loaded without pickle
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.arange(3, dtype=np.float16))
    spec2, _ = write_jpeg_shards(tmp_path / "npy", [4], extra={"logits.npy": buf.getvalue()})
    batch = next(make_loader(spec2, train=False, image_size=16, batch_size=4, members=("logits.npy",)))
    assert batch["logits.npy"].shape == (4, 3) and batch["logits.npy"].dtype == torch.float16


# ------------------------------------------------------------------------------------------- real multi-process


def test_torchrun_two_ranks_two_workers_exact_eval_and_equal_train_steps(tmp_path, uneven):
    spec, keys = uneven
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    results = {}
    for mode, spec_ in (("eval", spec), ("train", spec)):
        out = tmp_path / mode
        out.mkdir()
        cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(random.randint(20000, 40000)),
               str(Path(__file__).parent / "scripts" / "dump_keys.py"), spec_, str(out), mode, "2", "4", "1"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        results[mode] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    ev = results["eval"]
    seen = ev[0]["keys"] + ev[1]["keys"]
    assert sorted(seen) == sorted(keys)  # the union is the shard set's keys ...
    assert not [k for k, c in Counter(seen).items() if c > 1]  # ... with no duplicates
    tr = results["train"]
    steps = len(keys) // (2 * 4)
    assert [r["batches"] for r in tr] == [steps, steps] == [r["len"] for r in tr]
    both = tr[0]["keys"] + tr[1]["keys"]
    assert len(both) == len(set(both)) == steps * 8


def test_bench_smoke(tmp_path):
    from gte.data.bench import bench_loader

    r = bench_loader(workers=[0], images=12, image_size=16, batch_size=4, decoders=["pil"], model=None,
                     sizes=[(96, 72), (160, 120)])
    assert r["jpeg"]["width"] == 96 and [j["width"] for j in r["jpegs"]] == [96, 160]
    rows = [(x["jpeg"], x["transform"], x["reduced_decode"]) for x in r["loader"]]
    assert rows == [(j, t, red) for j in ("96x72", "160x120") for t in ("train", "eval") for red in (False, True)]
    assert all(x["img_per_s"] > 0 for x in r["loader"]) and all(x["vs_full"] > 0 for x in r["loader"][1::2])


def test_decode_margin_benchmark_runs_as_the_readme_shows():
    """`python benchmarks/decode_margin.py` (README, "What a run costs"), at two crops and one pass."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "decode_margin.py"), "--crops", "2", "--rounds", "1"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [x for x in r.stdout.splitlines() if x.startswith("| retina") or x.startswith("| astronaut")
            or x.startswith("| coffee")]
    assert len(rows) == 3 and all(x.count("×") >= 2 for x in rows), r.stdout
