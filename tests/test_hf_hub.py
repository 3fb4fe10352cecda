"""``timm/hf-hub:<repo>`` models from the local Hugging Face cache only: a real cache laid out as huggingface_hub
writes it (``models--<org>--<name>/{blobs,snapshots/<commit>,refs/main}``) holding files made by timm's own
``save_for_hf``; the model built from it has the saved weights and the config's mean/std; a repo not in the cache,
or a misspelt name, is a one-line error (also through the CLI); and no socket is ever opened."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _fixtures import HF_COMMIT, put_in_cache
from gte.errors import GteError
from gte.models import build_model, check_arch, external, info, load_model, save_model, to_model_input

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = "gte-test/mnv3-tiny"
NAME = f"timm/hf-hub:{REPO}"
MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
LABELS = ("a", "b", "c", "d", "e")
CLOSED = "http://127.0.0.1:9"  # the discard port, closed: any request fails loudly instead of reaching the Hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(cache dir, the saved timm model): a 5-class MobileNetV3 written by timm's ``save_for_hf`` into a cache."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=5,
                              pretrained_cfg_overlay=dict(mean=MEAN, std=STD)).eval()
    root = tmp_path_factory.mktemp("hf")
    save_for_hf(model, root / "export", safe_serialization=True, model_config={"label_names": list(LABELS)})
    put_in_cache(root / "cache", REPO, root / "export")
    # a repo of which only config.json was downloaded
    (root / "partial").mkdir()
    (root / "partial" / "config.json").write_bytes((root / "export" / "config.json").read_bytes())
    put_in_cache(root / "cache", "gte-test/config-only", root / "partial")
    # a repo whose config names an architecture this timm does not know
    (root / "future").mkdir()
    (root / "future" / "config.json").write_text('{"architecture": "no_such_net", "num_classes": 5}')
    (root / "future" / "model.safetensors").write_bytes((root / "export" / "model.safetensors").read_bytes())
    put_in_cache(root / "cache", "gte-test/future", root / "future")
    # a repo that has no config.json, as the cache records after a failed lookup (an empty .no_exist entry)
    (root / "other").mkdir()
    (root / "other" / "README.md").write_text("not a timm model")
    put_in_cache(root / "cache", "gte-test/other", root / "other")
    no_exist = root / "cache" / "models--gte-test--other" / ".no_exist" / HF_COMMIT
    no_exist.mkdir(parents=True)
    (no_exist / "config.json").touch()
    return root / "cache", model


@pytest.fixture(autouse=True)
def offline(hub, monkeypatch):
    """The cache above, HF_HUB_OFFLINE=1, a closed endpoint, and every socket connection recorded and refused."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert attempts == [], f"network attempted: {attempts}"


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_the_cached_model_has_the_saved_weights_and_the_configs_preprocessing(hub, tmp_path):
    _, saved = hub
    model, facts = external.build(NAME, 5)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(logits(model, x), logits(saved, x), rtol=0, atol=0)
    assert (facts.mean, facts.std) == (MEAN, STD) and facts.gradcam_layer == "blocks" and facts.head == "classifier"
    assert facts.geometry == {"input_size": 224, "crop_pct": 0.875, "interpolation": "bicubic",
                              "fixed_input_size": False} and facts.class_names == tuple(LABELS)
    # through gte's builder: ModelInfo carries the repo's mean/std; a saved gte model names the Hub arch and reloads
    built = build_model(NAME, 5)
    assert info(built).mean == MEAN and info(built).std == STD and info(built).arch == NAME
    assert info(built).class_names == tuple(LABELS) and info(built).interpolation == "bicubic"  # the repo's spec
    save_model(built, tmp_path / "m.safetensors")
    again = load_model(str(tmp_path / "m.safetensors"))
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(logits(again, to_model_input(info(again), images)),
                               logits(saved, (images - torch.tensor(MEAN).view(1, 3, 1, 1)) /
                                      torch.tensor(STD).view(1, 3, 1, 1)), rtol=1e-5, atol=1e-6)


def test_another_class_count_keeps_the_backbone_and_reinitialises_the_head(hub):
    _, saved = hub
    model, facts = external.build(NAME, 3)
    assert model.classifier.out_features == 3 and facts.class_names == ()
    torch.testing.assert_close(model.conv_stem.weight, saved.conv_stem.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.conv_head.weight, saved.conv_head.weight, rtol=0, atol=0)


def test_a_parameter_free_copy_reads_no_weights(hub, monkeypatch):
    import safetensors.torch

    def unread(*args, **kwargs):
        raise AssertionError("weights read for a parameter-free copy")

    monkeypatch.setattr(safetensors.torch, "load_file", unread)  # how timm reads model.safetensors
    with torch.device("meta"):  # gte's layer checks before a run
        model = build_model(NAME, 5)
    assert all(p.is_meta for p in model.parameters()) and info(model).gradcam_layer == "blocks"


def test_no_network_even_without_hf_hub_offline(hub, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)  # read at import: set as a fresh process would have it
    monkeypatch.setattr(hc, "ENDPOINT", CLOSED)
    model, _ = external.build(NAME, 5)  # the autouse fixture fails the test on any connection attempt
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(logits(model, x), logits(hub[1], x), rtol=0, atol=0)


@pytest.mark.parametrize("name,needles", [
    ("timm/hf-hub:gte-test/absent", ["gte-test/absent is not in the local Hugging Face cache",
                                     "`hf download gte-test/absent`", "gte never downloads"]),
    (f"timm/hf-hub:{REPO}@v2", [f"{REPO}@v2 is not in", f"`hf download {REPO} --revision v2`"]),
    ("timm/hf-hub:gte-test/config-only", ["gte-test/config-only is not in", "model.safetensors"]),
    ("timm/hf-hub:gte-test/future", ["timm/hf-hub:gte-test/future", "'no_such_net'", "does not know"]),
    ("timm/hf-hub:gte-test/other", ["gte-test/other has no config.json", "not a timm model repo"]),
    (f"hf-hub:{REPO}", [f"'{NAME}'"]),
    (f"timm/hf_hub:{REPO}", [f"'{NAME}'"]),
    ("timm/hf-hub:not a repo", ["not a Hugging Face Hub repo id"]),
])
def test_what_cannot_be_built_is_one_line(hub, name, needles):
    for attempt in ([lambda: check_arch(name)] if "future" not in name else []) + [lambda: build_model(name, 5)]:
        with pytest.raises(GteError) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg
    if "not in the local" in needles[0]:
        assert str(hub[0]) in msg  # where gte looked


def test_a_hub_teacher_needs_no_weights_file_when_its_head_fits_the_data(hub):
    from gte.config import DataConfig, DistillConfig, ModelConfig, Recipe
    from gte.validate import problems

    from gte.engine import build_models

    def recipe(n: int) -> Recipe:
        return Recipe(data=DataConfig(num_classes=n), teacher=ModelConfig(arch=NAME),
                      student=ModelConfig(arch="cifar_resnet20"), distill=DistillConfig(method="kd"))

    def teacher_problems(n: int) -> list[str]:
        return [p for p in problems(recipe(n)) if "teacher" in p]

    assert teacher_problems(5) == []  # the repo's own 5-class head: its weights are the teacher
    assert any("untrained" in p and "5 classes" in p for p in teacher_problems(4)), teacher_problems(4)
    _, teacher = build_models(recipe(5))  # what gte distill builds
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(logits(teacher, x), logits(hub[1], x), rtol=0, atol=0)


@pytest.mark.parametrize("repo,needle", [("gte-test/absent", "`hf download gte-test/absent`"),
                                         ("gte-test/future", "'no_such_net'")])  # not cached; cached, unbuildable
def test_the_cli_refuses_a_hub_model_it_cannot_build_in_one_line(hub, tmp_path, repo, needle):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    torch.save({"fc.weight": torch.zeros(5, 8)}, tmp_path / "m.pth")  # 5 classes, then the arch is built
    env = {k: v for k, v in os.environ.items() if k not in ("GTE_DEBUG", "HF_HUB_OFFLINE")}
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="200", HF_HUB_CACHE=str(hub[0]), HF_ENDPOINT=CLOSED)
    res = subprocess.run([sys.executable, "-m", "gte", "explain", str(tmp_path / "x.png"), "-m",
                          str(tmp_path / "m.pth"), "--arch", f"timm/hf-hub:{repo}", "-o", str(tmp_path / "e.png")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines[0].startswith("gte: error: ") and needle in lines[0], lines[0]


def test_a_repos_label_names_are_kept_with_their_control_characters_made_visible(hub, tmp_path):
    """A repo's ``label_names`` reach tables and pictures: ESC, BEL and C1 characters are shown as escapes."""
    from timm.models import save_for_hf

    hostile = ["\x1b]0;title\x07", "\x1b[2J", "\x9b31m", "d", "e"]
    save_for_hf(hub[1], tmp_path / "export", safe_serialization=True, model_config={"label_names": hostile})
    put_in_cache(hub[0], "gte-test/hostile-labels", tmp_path / "export")
    names = info(build_model("timm/hf-hub:gte-test/hostile-labels", 5)).class_names
    assert names == ("\\x1b]0;title\\x07", "\\x1b[2J", "\\x9b31m", "d", "e")
