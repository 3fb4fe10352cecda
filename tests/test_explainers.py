"""The explainer contract, over every registered explainer: one forward gives maps of the asked classes (one per
sample) with the declared channels, the logits of that forward, and — for a student in training — the same maps,
differentiable in the parameters."""

from __future__ import annotations

import pytest
import torch

from gte.errors import GteError
from gte.explainers import EXPLAINERS, choose_explainer, get
from gte.models import build_model, to_model_input, info


def _model_for(explainer):
    return build_model("bcos_cifar_resnet20" if explainer.needs_bcos else "cifar_resnet20", 5).double()


@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_every_explainer_keeps_the_contract(name):
    torch.manual_seed(0)
    ex = get(name)
    model = _model_for(ex).eval()
    x = to_model_input(info(model), torch.rand(3, 3, 16, 16, dtype=torch.float64))
    classes = torch.tensor([0, 3, 1])  # a different class per sample
    maps, logits = ex.explain_with_logits(model, x, classes)
    assert maps.shape == (3, ex.channels, 16, 16)
    torch.testing.assert_close(logits, model(x))
    # each sample's map is that of its own class: explaining one sample alone gives the same map
    alone, _ = ex.explain_with_logits(model, x[1:2], classes[1:2])
    torch.testing.assert_close(maps[1:2], alone)
    other, _ = ex.explain_with_logits(model, x, (classes + 1) % 5)
    assert not torch.allclose(other, maps)
    # training: the same maps and logits from the student's one forward (same mode), with a gradient that reaches
    # the parameters
    t_logits, explain = ex.training_forward(model, x)
    torch.testing.assert_close(t_logits, logits)
    torch.testing.assert_close(explain(classes), maps)
    explain(classes).square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert ex.attribution(x, maps).shape == (3, 16, 16)


def test_explainers_refuse_models_they_cannot_explain():
    with pytest.raises(GteError, match="needs a B-cos model"):
        get("bcos").check(build_model("cifar_resnet20", 5))
    with pytest.raises(GteError, match="no GradCAM layer"):
        get("gradcam").check(build_model("bcos_vit_ti_patch16_224", 5))
    with pytest.raises(GteError, match="unknown explainer 'lime'"):
        get("lime")
    assert choose_explainer("auto", True) == "bcos" and choose_explainer("auto", False) == "gradcam"
