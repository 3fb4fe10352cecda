"""Text from files reaching the terminal, rich, matplotlib and reports: class names in model metadata, ``--classes``
files, a data directory's ``classes.json`` / ``groups.json``, and file names. Control characters are shown as escapes
(no ESC, BEL or C1 reaches the terminal), rich markup and mathtext are shown as written, long values are bounded and
``report.md`` carries no HTML. Each case runs the real command in this process on a 4-class ``cifar_resnet20`` and a
few 32-px images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from _fixtures import run_main, write_jpeg_shards
from gte.models import build_model, save_model, with_spec
from gte.models.weights import model_metadata

pytestmark = pytest.mark.usefixtures("one_thread")

TERMINAL = re.compile("[\x07\x1b\x80-\x9f]")  # BEL, ESC and the C1 controls (U+0080–U+009F, CSI U+009B among them)
CONTROLS = ["\x1b[2J\x1b[Hclear", "\x1b]0;title\x07", "\x1b]52;c;cHduZWQ=\x07clip",
            "\x1b]8;;http://x.test/\x1b\\link\x1b]8;;\x1b\\"]  # clear screen, window title, clipboard, hyperlink
C1 = "\x9b2J\x90c1\x7f"  # CSI clear screen as one C1 character, DCS, DEL
MARKUP = ["[/]", "[link=http://x.test/]l[/link]", "[bold]b", "e[/bold]"]
MATH = ["$\\frac{1}{0$", "$x^$", "$\\notacommand$", "a$b$c"]  # mathtext that does not parse


def _model(path: Path, names: list[str] | None = None) -> str:
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 4)
    if names:
        with_spec(model, class_names=names)
    save_model(model, path)
    return str(path)


def _clean(out: str, err: str) -> None:
    found = TERMINAL.findall(out + err)
    assert not found, f"{found} reached the terminal:\n{out!r}\n{err!r}"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    Image.new("RGB", (32, 32), (120, 60, 200)).save(root / "img.png")
    _model(root / "plain.safetensors")
    return root


def _data(root: Path, classes: list[str] | None = None, groups: list[str] | None = None, name: str = "data") -> str:
    """8 samples in one shard, 4 classes, 2 groups; ``classes.json`` / ``groups.json`` beside it."""
    spec, _ = write_jpeg_shards(root / name, [8], width=32, height=32)
    for file, names in (("classes.json", classes), ("groups.json", groups)):
        if names is not None:
            (root / name / file).write_text(json.dumps(names), encoding="utf-8")
    return spec


# ------------------------------------------------------------------------------------------ B1 control characters
@pytest.mark.parametrize("source", ["metadata", "--classes", "groups.json", "classes.json", "file name", "recipe"])
def test_control_characters_from_files_never_reach_the_terminal(source, root, tmp_path, monkeypatch, capsys):
    names = [CONTROLS[0] + C1, *CONTROLS[1:]]
    explain = ["explain", str(root / "img.png"), "--out", str(tmp_path / "e.png")]
    if source == "metadata":
        argv = [*explain, "--model", _model(tmp_path / "m.safetensors", names)]
    elif source == "--classes":
        (tmp_path / "names.json").write_text(json.dumps(names))
        argv = [*explain, "--model", str(root / "plain.safetensors"), "--classes", str(tmp_path / "names.json")]
    elif source == "groups.json":
        argv = ["data", "info", _data(tmp_path, groups=names[:2])]
    elif source == "classes.json":  # the few-shot summary names the classes of the source's classes.json
        argv = ["data", "fewshot", _data(tmp_path, classes=names), "--shots", "1", "--holdout", "1", "--workers", "1",
                "--out", str(tmp_path / "few")]
    elif source == "file name":  # in an error line: not an image
        bad = tmp_path / f"{names[1]}{C1}.png"
        bad.write_bytes(b"not an image")
        argv = ["explain", str(bad), "--model", str(root / "plain.safetensors")]
    else:  # a value of a recipe (TOML escapes) in the problems of a dry run
        (tmp_path / "r.toml").write_text('[data]\ntrain = "/x/\\u001b]0;title\\u0007/\\u009b2J-*.tar"\n')
        argv = ["distill", "--recipe", str(tmp_path / "r.toml"), "--dry-run"]
    code, out, err = run_main(argv, monkeypatch, capsys)
    assert code == (0 if source in ("metadata", "--classes", "groups.json", "classes.json") else 2), err
    _clean(out, err)
    assert "\\x1b" in out + err  # shown, as an escape


# ------------------------------------------------------------------------------------------ B2 rich markup
@pytest.mark.parametrize("case", ["explain metadata", "explain file name", "eval", "data info"])
def test_rich_markup_in_names_and_file_names_is_shown_as_written(case, root, tmp_path, monkeypatch, capsys):
    shown = MARKUP
    if case == "explain metadata":
        argv = ["explain", str(root / "img.png"), "--model", _model(tmp_path / "m.safetensors", MARKUP), "--out",
                str(tmp_path / "e.png")]
    elif case == "explain file name":
        image = tmp_path / "[link=x]img[bold].png"  # markup that would hide itself; the --out's [/] would crash
        Image.new("RGB", (32, 32)).save(image, format="PNG")
        argv = ["explain", str(image), "--model", str(root / "plain.safetensors"), "--out", str(tmp_path / "[/]e.png")]
        shown = [image.name]
    elif case == "eval":  # the table came after the whole evaluation, and --json after the table
        argv = ["eval", _model(tmp_path / "m.safetensors", MARKUP), "--data", _data(tmp_path, MARKUP, MARKUP[:2]),
                "--json", str(tmp_path / "m.json"), "--batch-size", "8"]
        shown = ["0 [/]", "1 [link=http://x.test/]l[/link]"]  # the group names
    else:
        argv = ["data", "info", _data(tmp_path, groups=MARKUP[:2])]
        shown = MARKUP[:2]
    code, out, err = run_main(argv, monkeypatch, capsys)
    assert code == 0, err
    for text in shown:
        assert text in out, f"{text!r} not in\n{out}"
    if case == "eval":
        assert json.loads((tmp_path / "m.json").read_text())["group_names"] == {"0": "[/]", "1": MARKUP[1]}


def test_eval_writes_its_json_before_the_table(root, tmp_path, monkeypatch, capsys):
    """Whatever the terminal table meets, the metrics of a finished evaluation are on disk."""
    import gte.report

    def broken(*args, **kwargs):
        raise RuntimeError("the table failed")

    monkeypatch.setattr(gte.report, "print_summary", broken)
    with pytest.raises(RuntimeError):
        run_main(["eval", str(root / "plain.safetensors"), "--data", _data(tmp_path), "--json",
                  str(tmp_path / "m.json"), "--batch-size", "8"], monkeypatch, capsys)
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 8


# ------------------------------------------------------------------------------------------ B3 mathtext
@pytest.mark.parametrize("case", ["explain class names", "explain file name", "eval --report"])
def test_dollar_signs_never_reach_mathtext(case, root, tmp_path, monkeypatch, capsys):
    if case == "explain class names":
        argv = ["explain", str(root / "img.png"), "--model", _model(tmp_path / "m.safetensors", MATH)]
    elif case == "explain file name":
        image = tmp_path / "$\\frac{1}{0$.png"
        Image.new("RGB", (32, 32)).save(image, format="PNG")
        argv = ["explain", str(image), "--model", str(root / "plain.safetensors")]
    else:  # class names in the explanation grid, group names under the bars
        argv = ["eval", _model(tmp_path / "m.safetensors"), "--data", _data(tmp_path, MATH, MATH[:2]), "--report",
                str(tmp_path / "report"), "--examples", "2", "--batch-size", "8"]
    pictures = ["report/groups.png", "report/grid.png"] if case == "eval --report" else ["e.png"]
    if case != "eval --report":
        argv += ["--out", str(tmp_path / "e.png")]
    code, _, err = run_main(argv, monkeypatch, capsys)
    assert code == 0, err
    for name in pictures:
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 100
    if case == "eval --report":
        assert "\\$\\\\frac{1}{0\\$" in (tmp_path / "report" / "report.md").read_text()  # Markdown math escaped too


# ------------------------------------------------------------------------------------------ B5 not UTF-8
@pytest.mark.parametrize("command", ["explain", "convert"])
def test_a_classes_file_that_is_not_utf8_is_one_line(command, root, tmp_path, monkeypatch, capsys):
    names = tmp_path / "latin1.json"
    names.write_bytes(json.dumps(["caf\u00e9", "b", "c", "d"], ensure_ascii=False).encode("latin-1"))
    if command == "explain":
        argv = ["explain", str(root / "img.png"), "--model", str(root / "plain.safetensors"), "--classes", str(names)]
    else:
        torch.save(build_model("cifar_resnet20", 4).state_dict(), tmp_path / "w.pth")
        argv = ["convert", str(tmp_path / "w.pth"), "--arch", "cifar_resnet20", "--classes", str(names), "--out",
                str(tmp_path / "m.safetensors")]
    code, _, err = run_main(argv, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("gte: error: ") and str(names) in lines[0] and "UTF-8" in lines[0], err


# ------------------------------------------------------------------------------------------ B13 bounded values
MILLION = [0.5] * 1_000_000


@pytest.mark.parametrize("case", ["metadata mean", "convert --mean", "2 MB class name"])
def test_long_values_from_files_are_printed_bounded(case, root, tmp_path, monkeypatch, capsys):
    if case == "metadata mean":
        from safetensors.torch import save_file

        model = build_model("cifar_resnet20", 4)
        meta = model_metadata(model)
        meta["input_spec"] = json.dumps({**json.loads(meta["input_spec"]), "mean": MILLION})
        save_file(model.state_dict(), str(tmp_path / "m.safetensors"), meta)
        argv = ["explain", str(root / "img.png"), "--model", str(tmp_path / "m.safetensors")]
    elif case == "convert --mean":
        argv = ["convert", str(tmp_path / "w.pth"), "--arch", "cifar_resnet20", "--mean",
                ",".join(map(str, MILLION)), "--out", str(tmp_path / "m.safetensors")]
    else:
        long = "n" * 2_000_000
        argv = ["explain", str(root / "img.png"), "--model", _model(tmp_path / "m.safetensors", [long, "a", "b", "c"]),
                "--out", str(tmp_path / "e.png")]
    code, out, err = run_main(argv, monkeypatch, capsys)
    if case == "2 MB class name":
        assert code == 0 and "characters)" in out, err  # shortened, and says so
        assert len(out) + len(err) < 10_000
    else:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "mean" in lines[0], err[:500]
        assert len(lines[0]) < 400 and "characters)" in lines[0], lines[0][:500]


@pytest.mark.parametrize("case", ["group name", "file name"])
def test_report_md_carries_no_html(case, root, tmp_path, monkeypatch, capsys):
    html = "<img src=x onerror=alert(1)>"
    if case == "group name":
        spec = _data(tmp_path, groups=[html, "<script>alert(2)</script>"])
    else:
        spec = _data(tmp_path, name="d`<b>x</b>`")  # the backtick ended the code span the path was written in
    code, _, err = run_main(["eval", str(root / "plain.safetensors"), "--data", spec, "--report",
                             str(tmp_path / "report"), "--examples", "0", "--batch-size", "8"], monkeypatch, capsys)
    assert code == 0, err
    md = (tmp_path / "report" / "report.md").read_text()
    assert not re.search(r"(?<!\\)<[a-z/]", md), md  # every < escaped: no tag a Markdown renderer would pass on
    assert ("\\<img src=x onerror=alert(1)\\>" if case == "group name" else "d\\`\\<b\\>x\\</b\\>\\`") in md
