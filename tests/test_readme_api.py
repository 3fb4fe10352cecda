"""The README's Python API block runs as written (a 4-class B-cos teacher file and a batch of images provided)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from gte.models import build_model, save_model

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.usefixtures("one_thread")
def test_readme_python_api_block_runs(tmp_path, monkeypatch):
    section = README.read_text().split("## Python API", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_model(build_model("bcos_cifar_resnet20", 4), tmp_path / "teacher.safetensors")
    scope = {"images": torch.rand(2, 3, 32, 32)}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 — our own README
    student = scope["student"]
    assert all(p.grad is not None for p in student.parameters())
    assert scope["w_a"].shape == scope["w_b"].shape == (2, 6, 32, 32)
    assert torch.allclose(scope["w_a"], scope["w_s"])  # one forward, the same W(x) of the same class
    logs, method = scope["logs"], scope["method"]
    assert {"ce", "crd", "exp"} <= set(logs) and all(p.grad is not None for p in method.parts.parameters())
