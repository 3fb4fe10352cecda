"""Numbers, structures and types read from files and options: model metadata, ``gte convert`` options and inputs,
a Hugging Face Hub repo's config.json, recipes and ``--set``, eval/explain sizes, and ``gte.timm_task.E2KDTask``'s
arguments. Each bad value is one line on stderr and exit code 2 (or a clear exception from the library), never a
traceback, a RecursionError, an allocation of a size read from the file, or a silent wrong result. Real files written
here (safetensors with crafted metadata, ``torch.save`` state dicts, a Hub cache laid out as huggingface_hub writes
it); commands run in this process through ``gte.cli.main``."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _fixtures import one_line_exit_2, put_in_cache, run_main, write_jpeg_shards
from gte.errors import GteError
from gte.models import build_model, info, load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DEEP = 100_000  # far past Python's recursion limit: json and tomllib recurse once per level
DEEP_JSON = "[" * DEEP + "]" * DEEP
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(directory, a 4-class cifar_resnet20 model.safetensors, a 32-px PNG, one shard of 4 images)."""
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    save_model(build_model("cifar_resnet20", 4), root / "m.safetensors")
    Image.new("RGB", (32, 32), (90, 120, 200)).save(root / "x.png")
    spec, _ = write_jpeg_shards(root / "shards", [4], width=32, height=32)
    return root, root / "m.safetensors", root / "x.png", spec


def with_metadata(src, dst, spec: dict | None = None, **raw: str):
    """``src`` rewritten to ``dst`` with ``input_spec`` fields changed (``spec``) and raw metadata strings set."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    if spec is not None:
        meta["input_spec"] = json.dumps({**json.loads(meta["input_spec"]), **spec})
    save_file(load_file(str(src)), str(dst), metadata={**meta, **raw})
    return dst


def explain(model, png, *more: str) -> list[str]:
    return ["explain", str(png), "--model", str(model), "--out", str(png.with_name("out.png")), *more]


# ------------------------------------------------------------------------------------------------ B4: deep nesting
@pytest.mark.parametrize("where", ["input_spec", "class_names", "--classes", "recipe", "--set", "extends"])
def test_deeply_nested_json_and_toml_is_one_line(where, files, tmp_path, monkeypatch, capsys):
    _, model, png, _ = files
    monkeypatch.chdir(tmp_path)
    if where in ("input_spec", "class_names"):
        raw = '{"input_size": ' + DEEP_JSON + "}" if where == "input_spec" else DEEP_JSON
        bad = with_metadata(model, tmp_path / "deep.safetensors", **{where: raw})
        one_line_exit_2(explain(bad, png), monkeypatch, capsys, "deep.safetensors", where, "nested")
    elif where == "--classes":
        (tmp_path / "deep.json").write_text(DEEP_JSON)
        one_line_exit_2(explain(model, png, "--classes", str(tmp_path / "deep.json")), monkeypatch, capsys,
                        "deep.json", "nested")
    elif where == "recipe":
        (tmp_path / "deep.toml").write_text("[data]\ncrop_scale = " + "[" * DEEP + "]" * DEEP + "\n")
        one_line_exit_2(["distill", "--recipe", str(tmp_path / "deep.toml")], monkeypatch, capsys, "deep.toml",
                        "nested")
    elif where == "--set":
        one_line_exit_2(["distill", "--set", "data.crop_scale=" + "[" * DEEP + "]" * DEEP], monkeypatch, capsys,
                        "--set data.crop_scale", "nested")
    else:  # a chain of 1200 recipes, each extending the next
        for k in range(1200):
            (tmp_path / f"r{k}.toml").write_text(f'extends = "r{k + 1}.toml"\n' if k < 1199 else "[data]\n")
        one_line_exit_2(["distill", "--recipe", str(tmp_path / "r0.toml")], monkeypatch, capsys, "extend", "r16.toml")


# ------------------------------------------------------------------------------------------------ B6: mean / std
@pytest.mark.parametrize("key,value", [("mean", [NAN, 0.4, 0.4]), ("mean", [INF, 0.4, 0.4]),
                                       ("std", [0.2, NAN, 0.2]), ("std", [0.2, INF, 0.2])])
def test_a_non_finite_mean_or_std_in_a_model_file_is_refused(key, value, files, tmp_path, monkeypatch, capsys):
    _, model, png, _ = files
    bad = with_metadata(model, tmp_path / "bad.safetensors", {key: value})
    one_line_exit_2(explain(bad, png), monkeypatch, capsys, "bad.safetensors", key, "finite")


@pytest.mark.parametrize("flag,value", [("--mean", "nan,0.4,0.4"), ("--mean", "0.4,inf,0.4"),
                                        ("--std", "0.2,0.2,nan"), ("--std", "inf,0.2,0.2")])
def test_convert_refuses_a_non_finite_mean_or_std(flag, value, files, tmp_path, monkeypatch, capsys):
    _, model, _, _ = files
    torch.save(load_model(str(model)).state_dict(), tmp_path / "w.pth")  # the model's own key order
    one_line_exit_2(["convert", str(tmp_path / "w.pth"), "--arch", "cifar_resnet20", "--out",
                     str(tmp_path / "out.safetensors"), f"{flag}={value}"], monkeypatch, capsys, flag[2:], "finite")
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------------------------------------ B7: class count
def test_convert_of_a_safetensors_state_dict_reads_the_class_count_from_the_head(tmp_path, monkeypatch, capsys):
    """Sorted keys (as safetensors lists them) end with ``layer3.…``: the last weight is not the classifier."""
    torch.manual_seed(0)
    mine = build_model("cifar_resnet20", 3)
    save_file({k: v.contiguous() for k, v in mine.state_dict().items()}, str(tmp_path / "mine.safetensors"))
    code, _, err = run_main(["convert", str(tmp_path / "mine.safetensors"), "--arch", "cifar_resnet20", "--out",
                             str(tmp_path / "out.safetensors")], monkeypatch, capsys)
    assert code == 0, err
    back = load_model(str(tmp_path / "out.safetensors"))
    assert info(back).num_classes == 3
    torch.testing.assert_close(back.fc.weight, mine.fc.weight, rtol=0, atol=0)


@pytest.mark.parametrize("classes", [10**9, 10**12])
def test_a_crafted_head_shape_is_refused_before_anything_is_allocated(classes, tmp_path, monkeypatch, capsys):
    """A 2 kB ``.pth`` whose classifier is an expanded view claiming ``classes`` rows (its storage: 64 floats)."""
    state = build_model("cifar_resnet20", 2).state_dict()
    state["fc.weight"] = torch.zeros(1, 64).expand(classes, 64)
    state["fc.bias"] = torch.zeros(1).expand(classes)
    torch.save(state, tmp_path / "crafted.pth")
    for argv in (["convert", str(tmp_path / "crafted.pth"), "--arch", "cifar_resnet20", "--out",
                  str(tmp_path / "o.safetensors")],
                 ["eval", str(tmp_path / "crafted.pth"), "--arch", "cifar_resnet20", "--data", "none.tar"]):
        one_line_exit_2(argv, monkeypatch, capsys, "crafted.pth", "fc.weight", "crafted")


def test_convert_asks_for_num_classes_where_the_head_is_unknown(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    mine = build_model("torchvision/squeezenet1_1", 3)  # its classifier is a conv inside a Sequential: not a known head
    save_file({k: v.contiguous() for k, v in mine.state_dict().items()}, str(tmp_path / "sq.safetensors"))
    argv = ["convert", str(tmp_path / "sq.safetensors"), "--arch", "torchvision/squeezenet1_1", "--out",
            str(tmp_path / "out.safetensors")]
    one_line_exit_2(argv, monkeypatch, capsys, "sq.safetensors", "--num-classes")
    code, _, err = run_main([*argv, "--num-classes", "3"], monkeypatch, capsys)
    assert code == 0 and info(load_model(str(tmp_path / "out.safetensors"))).num_classes == 3, err


# ------------------------------------------------------------------------------- B4, B6, B8, B13: a Hub config.json
HUB_CASES = {  # repo name -> (change to config.json's pretrained_cfg (or top level with "top."), words in the error)
    "crop-abc": ({"crop_pct": "abc"}, ["pretrained_cfg.crop_pct", "'abc'"]),
    "mean-5": ({"mean": 5}, ["pretrained_cfg.mean", "three finite numbers"]),
    "size-abc": ({"input_size": "abc"}, ["pretrained_cfg.input_size"]),
    "mean-nan": ({"mean": [NAN, 0.4, 0.4]}, ["pretrained_cfg.mean", "finite"]),
    "std-inf": ({"std": [0.2, INF, 0.2]}, ["pretrained_cfg.std", "finite"]),
    "labels-str": ({"top.label_names": "abcde"}, ["label_names", "list of strings"]),
    "fixed-str": ({"fixed_input_size": "false"}, ["pretrained_cfg.fixed_input_size"]),
    "deep": ({"top.pool": "DEEP"}, ["nested"]),
}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache holding one 5-class MobileNetV3 (timm's ``save_for_hf``) per case of :data:`HUB_CASES`,
    each with its config.json changed, and that model's state dict as a ``.pth``."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=5)
    root = tmp_path_factory.mktemp("hub")
    save_for_hf(model, root / "export", safe_serialization=True)
    torch.save(model.state_dict(), root / "m.pth")
    for repo, (change, _) in HUB_CASES.items():
        config = json.loads((root / "export" / "config.json").read_text())
        for key, value in change.items():
            target = config if key.startswith("top.") else config["pretrained_cfg"]
            target[key.removeprefix("top.")] = value
        text = json.dumps(config)
        if "DEEP" in text:
            text = text.replace('"DEEP"', DEEP_JSON)
        (root / repo).mkdir()
        (root / repo / "config.json").write_text(text)
        shutil.copy(root / "export" / "model.safetensors", root / repo / "model.safetensors")
        put_in_cache(root / "cache", f"gte-test/{repo}", root / repo)
    return root


@pytest.mark.parametrize("repo", list(HUB_CASES))
def test_a_hub_config_with_wrong_values_is_one_line(repo, hub_cache, files, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, png, _ = files
    line = one_line_exit_2(explain(hub_cache / "m.pth", png, "--arch", f"timm/hf-hub:gte-test/{repo}"), monkeypatch,
                           capsys, "config.json", *HUB_CASES[repo][1])
    assert f"gte-test--{repo}" in line  # the file in the cache


# ------------------------------------------------------------------------------- B9, B13: what convert writes
@pytest.mark.parametrize("options,needle", [
    (["--input-size", "16384"], "input_size"),  # over the one side limit (8192 at most)
    (["--input-size", "512", "--crop-pct", "0.05"], "crop_pct"),  # an eval resize of 10240
    (["--explain-layer", ""], "gradcam_layer"),
    (["--explain-layer", "fc"], "not a spatial feature map"),  # the classifier: N×C, nothing to explain at
])
def test_convert_never_writes_a_file_gte_would_refuse(options, needle, files, tmp_path, monkeypatch, capsys):
    _, model, _, _ = files
    torch.save(load_model(str(model)).state_dict(), tmp_path / "w.pth")  # the model's own key order
    one_line_exit_2(["convert", str(tmp_path / "w.pth"), "--arch", "cifar_resnet20", "--out",
                     str(tmp_path / "out.safetensors"), *options], monkeypatch, capsys, needle)
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------------------- B10: one image-side limit
@pytest.mark.parametrize("command,flag,value", [
    ("explain", "--image-size", "0"), ("explain", "--image-size", "-3"), ("explain", "--image-size", "100000"),
    ("explain", "--eval-resize", "100000"),
    ("eval", "--image-size", "0"), ("eval", "--image-size", "100000"), ("eval", "--eval-resize", "100000"),
    ("eval", "--teacher-image-size", "100000"),
])
def test_sizes_from_options_are_checked_against_one_limit(command, flag, value, files, monkeypatch, capsys):
    _, model, png, spec = files
    argv = explain(model, png) if command == "explain" else ["eval", str(model), "--data", spec, "--teacher",
                                                             str(model)]
    one_line_exit_2([*argv, flag, value], monkeypatch, capsys, flag, "side in pixels")


@pytest.mark.parametrize("spec,needle", [({"input_size": 16384}, "input_size"),  # the old cap of a spec's size
                                         ({"input_size": 512, "crop_pct": 0.05}, "crop_pct")])  # resize 10240
def test_sizes_from_a_model_file_are_checked_against_the_same_limit(spec, needle, files, tmp_path, monkeypatch,
                                                                    capsys):
    _, model, png, _ = files
    bad = with_metadata(model, tmp_path / "big.safetensors", spec)
    one_line_exit_2(explain(bad, png), monkeypatch, capsys, "big.safetensors", needle, "side in pixels")


def test_recipe_sizes_are_checked_against_the_same_limit(tmp_path, monkeypatch, capsys):
    (tmp_path / "r.toml").write_text("[data]\n")
    for key in ("data.image_size", "data.eval_resize", "teacher.image_size"):
        one_line_exit_2(["distill", "--recipe", str(tmp_path / "r.toml"), "--set", f"{key}=100000"], monkeypatch,
                        capsys, key, "side in pixels")


# ------------------------------------------------------------------------------- B13: wrong types, weights
@pytest.mark.parametrize("raw,needle", [
    ({"input_spec": "[1, 2]"}, "input_spec"),
    ({"spec": {"input_size": True}}, "input_size"),
    ({"spec": {"fixed_input_size": "false"}}, "fixed_input_size"),
    ({"spec": {"gradcam_layer": ""}}, "gradcam_layer"),
])
def test_metadata_of_the_wrong_type_is_refused(raw, needle, files, tmp_path, monkeypatch, capsys):
    _, model, png, _ = files
    raw = dict(raw)
    bad = with_metadata(model, tmp_path / "typed.safetensors", raw.pop("spec", None), **raw)
    one_line_exit_2(explain(bad, png), monkeypatch, capsys, "typed.safetensors", needle)


@pytest.mark.parametrize("value", [torch.ones(16, 3, 3, 3, dtype=torch.int64),
                                   torch.ones(16, 3, 3, 3, dtype=torch.bool),
                                   torch.ones(16, 3, 3, 3, dtype=torch.complex64), torch.full((16, 3, 3, 3), NAN)])
def test_weights_that_are_not_real_numbers_are_refused(value, files, tmp_path, monkeypatch, capsys):
    _, model, png, _ = files
    state = load_model(str(model)).state_dict()  # the model's own key order (the classifier last)
    assert state["stem.0.weight"].shape == value.shape
    torch.save({**state, "stem.0.weight": value}, tmp_path / "odd.pth")
    one_line_exit_2(explain(tmp_path / "odd.pth", png, "--arch", "cifar_resnet20"), monkeypatch, capsys,
                    "odd.pth", "stem.0.weight")


def test_half_precision_weights_are_still_cast(files, tmp_path):
    _, model, _, _ = files
    state = load_model(str(model)).state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "half.pth")
    loaded = load_model(str(tmp_path / "half.pth"), arch="cifar_resnet20")
    assert loaded.stem[0].weight.dtype == torch.float32


# ------------------------------------------------------------------------------- B13: gte.timm_task.E2KDTask
@pytest.mark.parametrize("case,needle", [
    ("no teacher", "needs a teacher"), ("2-number mean", "input_mean"), ("temperature 0", "distill.temperature"),
    ("negative lambda", "distill.lambda_exp"), ("download", "download"), ("1-channel input", "input must be"),
])
def test_e2kd_task_refuses_what_a_recipe_refuses(case, needle, monkeypatch):
    pytest.importorskip("timm")
    from gte.timm_task import E2KDTask

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    torch.manual_seed(0)
    student, teacher = build_model("cifar_resnet20", 4), build_model("cifar_resnet20", 4)
    kw = {"2-number mean": {"input_mean": (0.5, 0.5)}, "temperature 0": {"temperature": 0.0},
          "negative lambda": {"lambda_exp": -1.0}}.get(case, {})
    teacher_arg = {"no teacher": None, "download": "resnet18"}.get(case, teacher)
    with pytest.raises((GteError, ValueError), match=needle):
        task = E2KDTask(student, teacher_arg, verbose=False, **kw)
        task(torch.rand(2, 1, 32, 32), torch.tensor([0, 1]))  # "1-channel input"; the others fail when built
