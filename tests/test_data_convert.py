"""Shard converters on small fixture trees written here: labels, groups, boxes and class order round-trip exactly."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from gte.data.loader import make_loader
from gte.data.spec import expand_spec
from gte.data.writers.core import Item, parse_size, plan_shards
from gte.data.writers.imagefolder import convert_imagefolder
from gte.data.writers.voc import VOC_CLASSES, convert_voc
from gte.data.writers.waterbirds import convert_waterbirds
from gte.errors import GteError

from _fixtures import jpeg_bytes, write_imagefolder, write_jpeg_shards

GTE = str(Path(sys.executable).parent / "gte")


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("GTE_HOME", str(tmp_path / "home"))


def _read(spec: str | list[str]) -> dict[str, dict]:
    """key → {ext: decoded} via plain WebDataset (the on-disk contract, independent of gte's reader)."""
    out = {}
    for s in wds.WebDataset(spec, shardshuffle=False, empty_check=False):
        d = {k: v for k, v in s.items() if not k.startswith("__")}
        d["cls"] = int(d["cls"])
        d["json"] = json.loads(d["json"])
        out[s["__key__"]] = d
    return out


def test_imagefolder_labels_class_order_limits_and_resume(tmp_path):
    root = tmp_path / "tree"
    write_imagefolder(root, {"zebra": 3, "cat": 4, "dog": 2})  # created out of order; index = sorted order
    rng = np.random.default_rng(1)
    (root / "dog" / "sub").mkdir()
    (root / "dog" / "sub" / "deep.photo.jpeg").write_bytes(jpeg_bytes(rng))  # nested, dotted name
    buf = io.BytesIO()
    Image.fromarray(np.full((9, 7, 3), 200, np.uint8)).save(buf, "BMP")
    (root / "cat" / "odd.bmp").write_bytes(buf.getvalue())  # another format: stored as PNG
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # skipped and counted
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored
    out = tmp_path / "out"
    summaries, classes = convert_imagefolder(root, out, split="train", max_samples=4, max_bytes=0, workers=2)
    s = summaries[0]
    assert classes == ["cat", "dog", "zebra"]
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog", "zebra"]
    assert (s.samples, s.skipped, s.shards, s.written) == (11, 1, 3, 3)
    assert s.classes == {0: 5, 1: 3, 2: 3} and "broken.jpg" in s.problems[0]
    samples = _read(str(out / "train-{000000..000002}.tar"))
    assert len(samples) == 11
    for key, d in samples.items():
        assert d["cls"] == classes.index(key.split("/")[0])
        img_ext = [e for e in d if e in ("jpg", "png")]
        assert len(img_ext) == 1
    assert samples["dog/sub/deep_photo"]["jpg"] == (root / "dog" / "sub" / "deep.photo.jpeg").read_bytes()  # verbatim
    assert "png" in samples["cat/odd"]
    assert not list(out.glob("*.tmp"))
    index = json.loads((out / "shards.json").read_text())
    assert sum(v["n"] for v in index["shards"].values()) == 11
    # re-running the same conversion skips every finished shard (atomic: an existing .tar is complete)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000001.tar").unlink()  # as if the first run died while writing it
    again = convert_imagefolder(root, out, split="train", max_samples=4, max_bytes=0)[0][0]
    assert (again.written, again.samples, again.classes) == (1, 11, s.classes)
    assert (out / "train-000000.tar").stat().st_mtime_ns == before["train-000000.tar"]
    # a different conversion into the same directory is refused, unless asked to overwrite
    with pytest.raises(GteError, match="different conversion"):
        convert_imagefolder(root, out, split="train", max_samples=5, max_bytes=0)
    s5 = convert_imagefolder(root, out, split="train", max_samples=5, max_bytes=0, overwrite=True)[0][0]
    assert s5.shards == 3 and len(list(out.glob("train-*.tar"))) == 3
    # a val tree missing a class keeps the train indices with the train classes.json
    val = tmp_path / "val"
    write_imagefolder(val, {"zebra": 1, "cat": 1}, seed=3)
    with pytest.raises(GteError, match="other classes"):
        convert_imagefolder(val, out, split="val")
    convert_imagefolder(val, out, split="val", classes=classes)
    assert {d["cls"] for d in _read(str(out / "val-000000.tar")).values()} == {0, 2}


def test_byte_limit_and_sizes():
    assert parse_size("1GB") == 10**9 and parse_size("2KiB") == 2048 and parse_size("0") == 0
    items = [Item(str(i), Path("x"), 0, size=1000) for i in range(10)]
    shards = plan_shards(items, max_samples=0, max_bytes=7000)
    assert [len(s) for s in shards] == [2] * 5  # 1000 B + 2 kB tar overhead per sample
    assert [len(s) for s in plan_shards(items, 4, 0)] == [4, 4, 2]


def _waterbirds(root: Path) -> list[dict]:
    rng = np.random.default_rng(2)
    rows = []
    for i, (y, place, split) in enumerate([(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (1, 1, 0), (0, 0, 1),
                                           (1, 0, 1), (0, 1, 2), (1, 1, 2), (1, 0, 2)]):
        fn = f"{1 + y:03d}.{'Albatross' if y else 'Sparrow'}/bird_{i}.jpg"
        (root / fn).parent.mkdir(parents=True, exist_ok=True)
        (root / fn).write_bytes(jpeg_bytes(rng))
        rows.append({"img_id": i, "img_filename": fn, "y": y, "split": split, "place": place,
                     "place_filename": "/x/y.jpg"})
    with open(root / "metadata.csv", "w") as f:
        f.write("img_id,img_filename,y,split,place,place_filename\n")
        for r in rows:
            f.write(",".join(str(r[k]) for k in ("img_id", "img_filename", "y", "split", "place",
                                                  "place_filename")) + "\n")
    return rows


def test_waterbirds_groups_and_splits(tmp_path):
    root = tmp_path / "waterbird_complete95_forest2water2"
    rows = _waterbirds(root)
    out = tmp_path / "out"
    summaries, classes = convert_waterbirds(root, out, max_samples=3, max_bytes=0)
    assert classes == ["landbird", "waterbird"]
    assert [s.split for s in summaries] == ["train", "val", "test"]
    assert [s.samples for s in summaries] == [5, 2, 3]
    assert summaries[0].groups == {0: 1, 1: 1, 2: 1, 3: 2}
    for split_id, name in enumerate(["train", "val", "test"]):
        got = _read(expand_spec(str(out / f"{name}-*.tar")))
        want = [r for r in rows if r["split"] == split_id]
        assert len(got) == len(want)
        for r in want:
            d = got[r["img_filename"].replace(".jpg", "").replace(".", "_")]
            assert d["cls"] == r["y"]
            assert d["json"]["group"] == 2 * r["y"] + r["place"] and d["json"]["place"] == r["place"]
            assert d["jpg"] == (root / r["img_filename"]).read_bytes()
    # the loader reads groups straight from these shards
    batch = next(make_loader(str(out / "test-000000.tar"), train=False, image_size=16, batch_size=8))
    assert sorted(batch["group"].tolist()) == sorted(2 * r["y"] + r["place"] for r in rows if r["split"] == 2)


VOC_XML = """<annotation><folder>VOC2007</folder><filename>{id}.jpg</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = ("<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
       "<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>{part}</object>")


def test_voc_multilabel_boxes_and_class_order(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(3)
    images = {  # id → [(class, difficult, xmin, ymin, xmax, ymax)] in VOC's 1-based inclusive pixels
        "000005": [("chair", 0, 1, 1, 10, 12), ("person", 1, 3, 4, 20, 18), ("chair", 0, 5, 5, 6, 6)],
        "000007": [("car", 0, 2, 2, 24, 20)],
        "000009": [("tvmonitor", 0, 1, 1, 4, 4), ("aeroplane", 0, 2, 3, 22, 19)],
    }
    for image_id, objs in images.items():
        part = "<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></part>"
        xml = VOC_XML.format(id=image_id, w=24, h=20, objects="".join(
            OBJ.format(name=n, d=d, x0=a, y0=b, x1=c, y1=e, part=part if n == "person" else "")
            for n, d, a, b, c, e in objs))
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg_bytes(rng, 24, 20))
    (root / "ImageSets/Main/trainval.txt").write_text("000005\n000007\n")
    (root / "ImageSets/Main/test.txt").write_text("000009\n000010\n")  # 000010 has no annotation: skipped
    out = tmp_path / "voc"
    summaries, classes = convert_voc(root, out, splits=["trainval", "test"])
    assert json.loads((out / "classes.json").read_text()) == list(VOC_CLASSES) == classes
    assert VOC_CLASSES[:3] == ("aeroplane", "bicycle", "bird") and VOC_CLASSES[-1] == "tvmonitor"
    assert [s.samples for s in summaries] == [2, 1] and summaries[1].skipped == 1
    got = {**_read(str(out / "trainval-000000.tar")), **_read(str(out / "test-000000.tar"))}
    assert set(got) == set(images)
    for image_id, objs in images.items():
        j = got[image_id]["json"]
        assert j["box_labels"] == [VOC_CLASSES.index(o[0]) for o in objs]
        assert j["boxes"] == [[o[2] - 1, o[3] - 1, o[4], o[5]] for o in objs]  # 0-based, x1/y1 exclusive
        assert j["labels"] == sorted({VOC_CLASSES.index(o[0]) for o in objs})
        assert j["difficult"] == [o[1] for o in objs]
    assert got["000005"]["cls"] == VOC_CLASSES.index("person")  # the largest box
    assert got["000009"]["cls"] == VOC_CLASSES.index("aeroplane")
    # boxes and multi-labels come through the loader (eval geometry: 24×20 → short side 20, centre crop 20)
    batch = next(make_loader(str(out / "test-000000.tar"), train=False, image_size=20, eval_resize=20,
                             batch_size=4))
    assert batch["labels"] == [[0, 19]] and batch["box_labels"] == [[19, 0]]
    assert batch["boxes"][0] == [[0.0, 0.0, 2.0, 4.0], [0.0, 2.0, 20.0, 19.0]]  # x shifted by the 2 px crop


def test_timm_wds_layout_is_read_as_is(tmp_path):
    """HF timm/imagenet-1k-wds: jpg + cls + json {filename, label, class_name}, ImageNet-style keys."""
    spec, keys = write_jpeg_shards(tmp_path, [5, 4], prefix="imagenet1k-validation", num_classes=1000,
                                   key_format="ILSVRC2012_val_{i:08d}")
    got = [k for b in make_loader(spec, train=False, image_size=16, batch_size=4) for k in b["key"]]
    assert sorted(got) == keys
    res = subprocess.run([GTE, "data", "info", str(tmp_path), "--json", str(tmp_path / "info.json")],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    assert "9 samples in" in res.stdout  # the table is the result: stdout
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["samples"] == 9 and info["members"] == {"cls": 9, "jpg": 9, "json": 9}


def test_cli_shard_imagefolder_and_errors(tmp_path):
    root = tmp_path / "tree"
    write_imagefolder(root, {"b": 2, "a": 3})
    env = {**os.environ, "COLUMNS": "200", "GTE_HOME": str(tmp_path / "home")}
    res = subprocess.run([GTE, "data", "shard", "imagefolder", str(root), "--out", str(tmp_path / "o"),
                          "--max-samples", "2"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "0 a" in res.stderr and "1 b" in res.stderr and "train-{000000..000002}.tar" in res.stderr
    bad = subprocess.run([GTE, "data", "shard", "imagefolder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"gte: error: not a directory: {tmp_path / 'nope'}"]


def _mixed_tree(root: Path) -> None:
    """JPEG, PNG and BMP files under two classes (a tree as users have them)."""
    rng = np.random.default_rng(4)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i, fmt in enumerate(("JPEG", "PNG", "BMP")):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.{fmt}", fmt)


def _image_members(out: Path) -> set[str]:
    """Extensions of the image members across every shard of ``out``."""
    import tarfile

    exts = set()
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            exts |= {m.name.rsplit(".", 1)[-1] for m in tar if m.name.rsplit(".", 1)[-1] in ("jpg", "png", "webp")}
    return exts


@pytest.mark.parametrize("image_format", ["auto", "jpg", "png"])
def test_one_image_format_per_shard_set_and_timm_info(image_format, tmp_path):
    _mixed_tree(tmp_path / "tree")
    out = tmp_path / "out"
    summaries, _ = convert_imagefolder(tmp_path / "tree", out, max_samples=4, max_bytes=0, image_format=image_format)
    assert summaries[0].samples == 6 and summaries[0].skipped == 0
    # auto keeps each file's own bytes (BMP becomes PNG): the mixed set Hugging Face datasets refuses
    assert _image_members(out) == ({"jpg", "png"} if image_format == "auto" else {image_format})
    assert summaries[0].formats == ({"jpg": 2, "png": 4} if image_format == "auto" else {image_format: 6})
    if image_format == "png":  # lossless: a JPEG re-encoded as PNG decodes to the JPEG's own pixels
        stored = _read(str(out / "train-{000000..000001}.tar"))["a/0"]["png"]
        source = np.asarray(Image.open(tmp_path / "tree" / "a" / "0.JPEG"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), source)
    # timm's WebDataset reader sizes the split from _info.json (its fields, as timm's _parse_split_info reads them)
    info = json.loads((out / "_info.json").read_text())["splits"]["train"]
    assert info == {"name": "train", "num_samples": 6, "filenames": ["train-000000.tar", "train-000001.tar"],
                    "shard_lengths": [4, 2]}
    try:
        from timm.data.readers.reader_wds import ReaderWds
    except ImportError:
        return
    reader = ReaderWds(str(out), split="train")
    assert reader.num_samples == 6 and len(list(reader)) == 6


def test_hugging_face_datasets_loads_a_one_format_shard_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed")
    _mixed_tree(tmp_path / "tree")
    for image_format in ("auto", "jpg"):
        convert_imagefolder(tmp_path / "tree", tmp_path / image_format, max_samples=4, max_bytes=0,
                            image_format=image_format)

    def load(image_format: str):
        files = sorted(str(p) for p in (tmp_path / image_format).glob("train-*.tar"))
        return datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                                     cache_dir=str(tmp_path / "cache" / image_format))

    ds = load("jpg")
    assert len(ds) == 6 and sorted(ds["cls"]) == [0, 0, 0, 1, 1, 1] and ds[0]["jpg"].size == (24, 20)
    with pytest.raises(ValueError, match="same prefix or the same types"):
        load("auto")  # why --image-format exists: mixed jpg/png members are refused


def test_imagefolder_with_imagenet_classes(tmp_path, monkeypatch, capsys):
    """``--classes imagenet``: ImageNet-named folders get ImageNet's indices (torchvision's names: 'crane bird' and
    'crane' are told apart); a name a given list has twice is refused in one line rather than counted for both."""
    from _fixtures import run_main

    write_imagefolder(tmp_path / "photos", {"tiger cat": 2, "espresso": 1, "crane bird": 1})
    code, _, err = run_main(["data", "shard", "imagefolder", str(tmp_path / "photos"), "--out", str(tmp_path / "s"),
                             "--classes", "imagenet", "--no-shuffle"], monkeypatch, capsys)
    assert code == 0, err
    labels = sorted(int(s["cls"]) for s in wds.WebDataset(expand_spec(str(tmp_path / "s" / "train-*.tar")),
                                                        shardshuffle=False))
    assert labels == [134, 282, 282, 967]
    assert len(json.loads((tmp_path / "s" / "classes.json").read_text())) == 1000
    write_imagefolder(tmp_path / "birds", {"crane": 1})
    (tmp_path / "twice.json").write_text(json.dumps(["heron", "crane", "crane"]))
    code, _, err = run_main(["data", "shard", "imagefolder", str(tmp_path / "birds"), "--out", str(tmp_path / "b"),
                             "--classes", str(tmp_path / "twice.json")], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "folder 'crane' names classes [1, 2]" in err, err
