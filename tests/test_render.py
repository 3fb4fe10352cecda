"""`gte explain` pictures (gte.render): real tiny models saved with save_model, real PNG/JPEG files.

Oracles: the bcos package's own ``model.explain`` (W(x), contribution map and ``gradient_to_image`` rendering),
pytorch-grad-cam's ``show_cam_on_image`` (overlay) and ``GradCAM`` (normalised map), and an independent forward pass
for the teacher's top-1 class. User errors are checked through the real console script (exit 2, one stderr line).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from gte.errors import GteError
from gte.models import build_model, info, load_model, save_model, to_model_input
from gte.commands.explain import explain_images
from gte.render import JET, cam_overlay, class_names, explain_rows, load_image, preprocess

NAMES = ["heron", "puffin", "osprey", "wren"]
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def calibrated(name: str, seed: int, classes: int = len(NAMES)) -> nn.Module:
    """A 4-class model whose BN running stats come from one random batch (momentum 1), so outputs are not flat."""
    torch.manual_seed(seed)
    model = build_model(name, classes)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(to_model_input(info(model), torch.rand(16, 3, SIZE, SIZE)))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def picture(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth colour gradient plus a bright square, so crops and explanations have structure."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([xx, yy, 1 - xx * yy], -1) * rng.uniform(0.5, 1, 3)
    y0, x0 = rng.integers(0, h - 12), rng.integers(0, w - 12)
    img[y0:y0 + 12, x0:x0 + 12] = rng.uniform(0, 1, 3)
    return Image.fromarray(np.uint8(255 * img))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("render")
    save_model(calibrated("bcos_cifar_resnet20", 0), root / "bcos.safetensors",
               class_names=json.dumps(["m0", "m1", "m2", "m3"]))
    save_model(calibrated("cifar_resnet20", 1), root / "std.safetensors")
    picture(0).save(root / "img.png")
    picture(1).save(root / "img.jpg", quality=90)
    (root / "classes.json").write_text(json.dumps(NAMES))
    (root / "notes.png").write_text("not an image at all\n")
    data = (root / "img.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "bomb.png").write_bytes(png_declaring(20000, 20000))
    return root


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1×1 PNG whose IHDR claims width×height (CRC fixed): a decompression bomb's header, in 70 bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def run_gte(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GTE_DEBUG", "GTE_MAX_IMAGE_PIXELS")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="200", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "gte", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def rows_for(ws: Path, model: str, teacher: str | None = None, cls: int | None = None):
    images = [(str(ws / f), preprocess(load_image(ws / f), SIZE)) for f in ("img.png", "img.jpg")]
    t = load_model(str(ws / teacher)).eval() if teacher else None
    return explain_rows(images, load_model(str(ws / model)).eval(), t, cls)


# ------------------------------------------------------------------------------------------ (1) + (7) the CLI
def test_cli_writes_png_and_prints_class_names(ws):
    res = run_gte(["explain", "img.png", "--model", "bcos.safetensors", "--classes", "classes.json",
                   "--out", "out/x.png"], ws)
    assert res.returncode == 0, res.stderr[-3000:]
    with Image.open(ws / "out" / "x.png") as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0
        im.load()
    for name in NAMES:  # a 4-class top-5 lists every class, by the names from --classes (not the metadata's)
        assert name in res.stdout
    assert "m0" not in res.stdout and "sigmoid" in res.stdout
    assert not list((ws / "out").glob("*.tmp"))


def test_class_names_sources(ws):
    bcos, std = load_model(str(ws / "bcos.safetensors")), load_model(str(ws / "std.safetensors"))
    assert class_names(4, None, [bcos]) == ["m0", "m1", "m2", "m3"]  # the model's spec (safetensors metadata)
    assert class_names(4, str(ws / "classes.json"), [bcos]) == NAMES
    assert class_names(4, None, [std]) == [f"class {k}" for k in range(4)]
    assert class_names(1000)[:2] == ["tench", "goldfish"]  # torchvision's offline ImageNet metadata
    (ws / "three.json").write_text(json.dumps(NAMES[:3]))
    with pytest.raises(GteError, match="3 class names"):
        class_names(4, str(ws / "three.json"))


# ------------------------------------------------------------------------------------------ (2) the class matters
@pytest.mark.parametrize("model", ["bcos.safetensors", "std.safetensors"])
def test_explanations_of_two_classes_differ(ws, model):
    (r0,), (r1,) = ([rows_for(ws, model, cls=k)[0]] for k in (0, 1))
    p0, p1 = r0.panels[0], r1.panels[0]
    assert (p0.explained, p1.explained) == (0, 1)
    scale = p0.maps.abs().max()
    assert scale > 0 and (p0.maps - p1.maps).abs().max() > 1e-3 * scale
    assert np.abs(p0.picture.astype(float) - p1.picture.astype(float)).max() > 0.01


# ------------------------------------------------------------------------------------------ (3) teacher / student
def test_teacher_student_explain_the_teachers_top1(ws):
    rows = explain_images([str(ws / "img.png"), str(ws / "img.jpg")], str(ws / "std.safetensors"),
                          teacher=str(ws / "bcos.safetensors"), out=ws / "pair.png")
    teacher, student = (load_model(str(ws / f)).eval() for f in ("bcos.safetensors", "std.safetensors"))
    disagree = 0
    for row in rows:
        with torch.no_grad():
            top1 = int(teacher(to_model_input(info(teacher), row.image[None])).argmax(1))
            disagree += int(student(to_model_input(info(student), row.image[None])).argmax(1)) != top1
        assert row.explained == top1
        assert [p.role for p in row.panels] == ["teacher", "student"]
        assert [p.explained for p in row.panels] == [top1, top1]
    assert disagree  # these seeds make the student's own top-1 differ, so the check above has teeth
    with Image.open(ws / "pair.png") as im:  # image + 2 × (explanation, contribution/CAM) columns at 2.4 in × 100 dpi
        assert im.width >= 5 * 200


# ------------------------------------------------------------------------------------------ (4) B-cos oracle
def test_bcos_rendering_equals_bcos_explain(ws):
    model = load_model(str(ws / "bcos.safetensors")).eval()
    for row in rows_for(ws, "bcos.safetensors", cls=2):
        panel = row.panels[0]
        x = to_model_input(info(model), row.image[None]).clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = model.explain(x, idx=2)  # the package's own W(x) and gradient_to_image(smooth=15, 99.5)
        np.testing.assert_allclose(panel.maps.numpy(), theirs["dynamic_linear_weights"][0].numpy(), rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(panel.picture, theirs["explanation"], atol=1e-5)
        np.testing.assert_allclose(panel.heat, theirs["contribution_map"][0].detach().numpy(), rtol=1e-5, atol=1e-7)
        assert panel.picture.shape == (SIZE, SIZE, 4)


# ------------------------------------------------------------------------------------------ (5) GradCAM oracle
def test_gradcam_overlay_equals_show_cam_on_image(ws):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (16, 16, 3)).astype(np.float32)
    cam = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)  # every JET entry
    np.testing.assert_array_equal(cam_overlay(image, cam), show_cam_on_image(image, cam, use_rgb=True))
    assert JET.shape == (256, 3) and JET.dtype == np.uint8

    model = load_model(str(ws / "std.safetensors")).eval()
    for row in rows_for(ws, "std.safetensors", cls=3):
        panel = row.panels[0]
        img = row.image.permute(1, 2, 0).numpy()
        ref = show_cam_on_image(img, panel.heat, use_rgb=True)
        assert np.abs(panel.picture.astype(int) - ref.astype(int)).max() <= 1
        with GradCAM(model=model, target_layers=[model.layer3]) as gc:
            theirs = gc(to_model_input(info(model), row.image[None]), targets=[ClassifierOutputTarget(3)])[0]
        # Theirs min-max scales before the resize, ours after: here they agree to ~1e-5; a wrong class is ~0.7 off.
        np.testing.assert_allclose(panel.heat, theirs, atol=1e-3)


# ------------------------------------------------------------------------------------------ (6) bad input files
@pytest.mark.parametrize("name,needle", [("notes.png", "not an image"), ("cut.jpg", "truncated"),
                                         ("bomb.png", "decompression bomb")])
def test_bad_image_is_one_line_exit_2(ws, name, needle):
    res = run_gte(["explain", name, "--model", "bcos.safetensors", "--out", "bad.png"], ws)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    report = f"rc={res.returncode}\n{res.stderr[-3000:]}"
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, report
    assert lines[0].startswith("gte: error: ") and name in lines[0] and needle in lines[0], report
    assert not (ws / "bad.png").exists()


def test_limits_and_other_user_errors(ws, monkeypatch):
    Image.new("RGB", (100, 100)).save(ws / "big.png")
    with pytest.raises(GteError, match="decompression bomb"):  # 1–2× the limit is only a warning in PIL
        load_image(ws / "big.png", limit=6000)
    monkeypatch.setenv("GTE_MAX_IMAGE_PIXELS", "9999")
    with pytest.raises(GteError, match="big.png"):
        load_image(ws / "big.png")
    monkeypatch.delenv("GTE_MAX_IMAGE_PIXELS")
    assert load_image(ws / "big.png").size == (100, 100)
    with pytest.raises(GteError, match="image not found"):
        load_image(ws / "missing.png")
    with pytest.raises(GteError, match="out of range"):
        explain_images([str(ws / "img.png")], str(ws / "bcos.safetensors"), cls=4, out=ws / "never.png")
    assert not (ws / "never.png").exists()


# ------------------------------------------------------------------------------------------ (8) caption, colour bar
@pytest.mark.parametrize("model,cmap", [("bcos.safetensors", "bwr"), ("std.safetensors", "jet")])
def test_pictures_have_a_caption_and_a_colour_bar_of_the_map_scale(ws, model, cmap):
    import matplotlib

    from gte.render import figure

    rows = rows_for(ws, model, cls=2)
    fig = figure(rows, NAMES)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pixels = np.asarray(Image.open(buf).convert("RGB")).astype(float)
    captions = [ax.get_title(loc="left") for ax in fig.axes if "p = " in ax.get_title(loc="left")]
    assert len(captions) == len(rows)
    explainer = "B-cos W(x)" if cmap == "bwr" else "GradCAM"
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert all("osprey  p = " in c for c in captions) and explainer.split()[-1] in titles, captions
    lut = JET.astype(float) if cmap == "jet" else 255 * matplotlib.colormaps["bwr"](np.linspace(0, 1, 256))[:, :3]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == len(rows)  # one per attribution map
    for bar in bars:
        box = bar.get_window_extent()  # display pixels, origin at the bottom left; the PNG's rows run from the top
        height = pixels.shape[0]
        column = pixels[height - int(box.y1) + 2:height - int(box.y0) - 2, int((box.x0 + box.x1) / 2)]
        distance = ((column[:, None, :] - lut[None]) ** 2).sum(-1)
        index = distance.argmin(1)
        assert distance.min(1).max() < 30, "the bar's pixels are not the map's colours"
        assert np.all(np.diff(index) <= 2) and index[0] - index[-1] > 200, index  # the scale, top (max) to bottom


# ------------------------------------------------------------------------------------------ (9) readable pictures
LONG = ["great grey owl, Strix nebulosa", "ruddy turnstone, Arenaria interpres", "osprey", "wren",
        "American coot, marsh hen, mud hen, water hen, Fulica americana", "red-breasted merganser, Mergus serrator"]


@pytest.fixture(scope="module")
def six_class_rows(ws):
    """Teacher (B-cos) + student (standard) rows of a 6-class pair: a full top-5 under every map."""
    teacher, student = calibrated("bcos_cifar_resnet20", 2, 6), calibrated("cifar_resnet20", 3, 6)
    images = [(str(ws / f), preprocess(load_image(ws / f), SIZE)) for f in ("img.png", "img.jpg")]
    return explain_rows(images, student, teacher)


def drawn_texts(fig):
    """(axes or None, text artist) for every visible, non-empty text of a drawn figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    FigureCanvasAgg(fig).draw()  # as savefig lays it out (constrained layout), with a renderer to measure text
    owned = {id(t): ax for ax in fig.axes for t in ax.findobj(Text)}
    ticks, drawn = set(), set()  # an axis keeps spare ticks outside its view: their labels are not drawn
    for axis in (a for ax in fig.axes for a in (ax.xaxis, ax.yaxis)):
        low, high = sorted(axis.get_view_interval())
        for tick in axis.majorTicks + axis.minorTicks:
            ticks |= {id(tick.label1), id(tick.label2)}
            if tick.get_loc() is not None and low - 1e-9 * (high - low) <= tick.get_loc() <= high + 1e-9 * (high - low):
                drawn |= {id(tick.label1), id(tick.label2)}
    return [(owned.get(id(t)), t) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and (id(t) not in ticks or id(t) in drawn)]


def assert_readable(fig, min_pt: float = 10.0) -> None:
    """Every text ≥ ``min_pt`` points and inside the picture; no text covers another text or an axes (image, map,
    colour bar) not its own, nor runs across the edge of its own (a legend wider than its plot)."""
    texts = drawn_texts(fig)
    small = [(t.get_text(), t.get_fontsize()) for _, t in texts if t.get_fontsize() < min_pt]
    assert not small, small
    renderer = fig.canvas.get_renderer()
    boxes = [(ax, t, t.get_window_extent(renderer).expanded(1, 1).shrunk(0.98, 0.9)) for ax, t in texts]
    page = fig.bbox
    for _, t, box in boxes:  # nothing cut off at the edge of the picture
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, t.get_text()
    for ax, t, box in boxes:
        for other in fig.axes:
            area = other.get_window_extent(renderer)
            inside = other is ax and area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1
            assert inside or not box.overlaps(area), (t.get_text(), other.get_title())  # nothing across an edge
    for i, (_, t, box) in enumerate(boxes):
        for _, u, other in boxes[i + 1:]:
            assert not box.overlaps(other), (t.get_text(), u.get_text())


@pytest.mark.parametrize("count", [1, 6])  # gte explain of one image; the report's default grid of 6
def test_captions_stay_in_their_row_and_text_is_10pt(six_class_rows, count):
    from gte.render import figure, fit

    rows = [dataclasses.replace(r, path=f"photos/a_long_photo_name_from_a_camera_{i:04d}.jpg")
            for i, r in enumerate((six_class_rows * 3)[:count])]
    for row in rows:  # as the report captions its examples (gte.report.example_note)
        row.note = fit("label: ruddy turnstone, Arenaria interpres") + "\ngroup: landbird-on-water"
    fig = figure(rows, LONG)
    assert_readable(fig)
    assert fig.get_figwidth() * fig.dpi <= 1168  # the report page's width: shown at 100 %, never shrunk


def test_each_map_names_its_class_and_probability_and_how_to_read_it(ws):
    from gte.render import figure, prob_text

    rows = rows_for(ws, "std.safetensors", teacher="bcos.safetensors", cls=2)
    fig = figure(rows, NAMES)
    texts = [t.get_text() for _, t in drawn_texts(fig)]
    for row in rows:
        for p in row.panels:  # "osprey  p = 0.27" over every explanation, the probability of that very class
            assert any(f"osprey  p = {prob_text(p.prob)}" in t for t in texts), texts
    flat = " ".join(" ".join(texts).split())
    assert "B-cos W(x): colour = " in flat and "brighter = stronger positive evidence for the class" in flat
    assert "scaled to its own max" in flat and "GradCAM maps are each scaled to their own max" in flat
    assert sum("scaled to its own max" in t for t in texts) == len(rows)  # under each GradCAM panel
    assert prob_text(0.001) == "0.001" and prob_text(0.934) == "0.93"
    bcos_only = " ".join(t.get_text() for _, t in drawn_texts(figure(rows_for(ws, "bcos.safetensors"), NAMES)))
    assert "GradCAM" not in bcos_only and "teacher" not in bcos_only  # nothing about a teacher that is not there
