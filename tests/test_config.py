"""gte.config: recipes, --set overrides, strict keys and types, round trips."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from gte.config import DataConfig, Recipe, from_dict, load_recipe
from gte.errors import GteError


def test_shipped_demo_recipe():
    r = load_recipe("demo")
    assert isinstance(r, Recipe)
    assert r.demo.enabled is True
    assert r.student.arch == "bcos_cifar_resnet20"
    assert r.data.num_classes == 4 and r.data.image_size == 32
    assert r.distill.method == "e2kd"
    assert isinstance(r.optim.lr, float) and r.optim.lr == pytest.approx(1e-3)
    assert isinstance(r.optim.warmup_epochs, float) and r.optim.warmup_epochs == 1.0  # `1` in the file: int → float
    assert r.data.crop_scale == [0.6, 1.0]


def test_set_overrides_with_each_type():
    r = load_recipe(
        "demo",
        [
            "optim.epochs=3",
            "optim.lr=1e-4",
            "distill.temperature=4",  # int accepted for a float field
            "student.arch=bcos_resnet18",  # bare string, no quotes
            'run.out="runs/x y"',  # quoted TOML string
            "data.crop_scale=[0.5, 1.0]",
            "demo.enabled=false",
            "run.out=/tmp/some/dir",
        ],
    )
    assert r.optim.epochs == 3 and isinstance(r.optim.epochs, int)
    assert r.optim.lr == pytest.approx(1e-4) and isinstance(r.optim.lr, float)
    assert r.distill.temperature == 4.0 and isinstance(r.distill.temperature, float)
    assert r.student.arch == "bcos_resnet18"
    assert r.data.crop_scale == [0.5, 1.0]
    assert r.demo.enabled is False
    assert r.run.out == "/tmp/some/dir"  # the later --set wins
    # Keys not in the file are set too (defaults come from the dataclasses).
    r2 = load_recipe("demo", ["teacher.weights=t.safetensors", "distill.guided_every=16"])
    assert r2.teacher.weights == "t.safetensors" and r2.distill.guided_every == 16


def test_unknown_key_is_named():
    with pytest.raises(GteError, match=r"'optim\.lrr'"):
        load_recipe("demo", ["optim.lrr=0.1"])


def test_unknown_key_in_file_is_named(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[data]\nnum_classes = 4\nimage_sise = 32\n")
    with pytest.raises(GteError, match=r"'data\.image_sise'"):
        load_recipe(str(p))


def test_unknown_section():
    with pytest.raises(GteError, match="'optimizer'"):
        load_recipe("demo", ["optimizer.lr=0.1"])
    with pytest.raises(GteError, match="section"):
        from_dict({"trainer": {"lr": 1}})


def test_section_must_be_a_table():
    with pytest.raises(GteError, match="optim"):
        load_recipe("demo", ["optim=3"])
    with pytest.raises(GteError, match="lr"):
        load_recipe("demo", ["optim.lr.x=3"])  # lr is a value, not a section


@pytest.mark.parametrize(
    "item,key",
    [
        ("optim.epochs=abc", "optim.epochs"),
        ("optim.epochs=1.5", "optim.epochs"),
        ("optim.epochs=true", "optim.epochs"),  # bool is not an int here
        ("optim.lr=fast", "optim.lr"),
        ("demo.enabled=1", "demo.enabled"),
        ("student.arch=3", "student.arch"),
        ("data.crop_scale=0.5", "data.crop_scale"),
    ],
)
def test_wrong_type(item, key):
    with pytest.raises(GteError, match=key.replace(".", r"\.")):
        load_recipe("demo", [item])


def test_set_without_equals():
    with pytest.raises(GteError, match="key=value"):
        load_recipe("demo", ["optim.lr"])


def test_non_toml_file(tmp_path):
    p = tmp_path / "recipe.toml"
    p.write_text("this is not = = toml [\n")
    with pytest.raises(GteError, match="TOML"):
        load_recipe(str(p))
    b = tmp_path / "binary.toml"
    b.write_bytes(b"\xff\xfe\x00\x81 binary")
    with pytest.raises(GteError):
        load_recipe(str(b))


def test_missing_recipe_points_to_the_list(tmp_path):
    with pytest.raises(GteError, match="neither a file nor a shipped recipe \\(`gte recipes` lists them\\)"):
        load_recipe(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("name, overrides, message", [
    ("imagenet-fewshots", [], "did you mean imagenet-fewshot, "),
    ("demo", ["optim.epoch=3"], "unknown recipe key 'optim.epoch'; did you mean optim.epochs"),
    ("demo", ["optm.lr=3"], "unknown recipe section 'optm'; did you mean optim\\?"),
    ("demo", ["optim.epochs"], "write --set optim.epochs=VALUE"),
])
def test_misspelt_names_and_keys_get_close_matches(name, overrides, message):
    with pytest.raises(GteError, match=message):
        load_recipe(name, overrides)


def test_set_with_a_space_instead_of_equals_is_one_line(monkeypatch, capsys):
    from gte.cli import main

    monkeypatch.setattr("sys.argv", ["gte", "distill", "--dry-run", "--set", "optim.epochs", "3"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "gte: error: --set expects key=value, got 'optim.epochs' '3': write --set " \
        "optim.epochs=3\n"


def test_round_trip_to_toml_from_dict():
    r = load_recipe("demo", ["optim.lr=3e-4", "data.crop_scale=[0.25, 0.75]", "student.arch=resnet18"])
    text = r.to_toml()
    back = from_dict(tomllib.loads(text))
    assert back == r
    assert back.to_toml() == text
    assert back.digest() == r.digest()
    changed = from_dict({**tomllib.loads(text), "optim": {**tomllib.loads(text)["optim"], "lr": 1e-2}})
    assert changed.digest() != r.digest()


def test_defaults_round_trip_and_empty_recipe():
    assert from_dict({}) == Recipe()
    assert from_dict(tomllib.loads(Recipe().to_toml())) == Recipe()
    # every section is a dataclass with a default for every field
    for f in dataclasses.fields(Recipe):
        assert dataclasses.is_dataclass(getattr(Recipe(), f.name))
    assert DataConfig().crop_scale is not DataConfig().crop_scale  # no shared mutable default


@pytest.mark.parametrize("override", ["distill.temperature=inf", "optim.lr=inf", "distill.lambda_exp=nan",
                                      "optim.warmup_epochs=inf"])
def test_non_finite_recipe_values_are_refused(override):
    """inf passes "> 0" and nan fails nothing one might forget to negate: every float key must be finite."""
    with pytest.raises(GteError, match=f"recipe key '{override.split('=')[0]}' must be a finite number"):
        load_recipe("demo", [override])
