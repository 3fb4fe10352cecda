"""A B-cos student's training logits and its explanation W(x) from ONE forward pass, with the official e2KD gradient.

e2KD needs two derivatives of the same student forward:

- the KD (and CE) term wants the ordinary parameter gradient of the logits, through every dynamic factor ``s(θ, x)``
  (the B-cos scaling ``|ŵ·x|/‖x‖``, the uncentered norms' ``1/σ``, the ViT's attention matrix);
- W(x) is the input gradient with those factors held *constant* (explanation mode), and the explanation loss
  ``1 − cos(W_T, W_S)`` is differentiated in θ *exactly*: the factors are constants only for the inner derivative in
  x, not for the outer one in θ. This is what the official code computes (its ``DynamicMultiplication`` saves the
  factor with its graph and reads the explanation flag at backward time; checked against it in float64 and against
  central finite differences in ``tests/test_exact_gradient.py``).

The forward values are identical in both cases; only the backward differs. Every factor enters its product through a
function of :mod:`gte.bcos_kernels` that reads a :class:`~gte.bcos_kernels.Gate` at backward time: closed while W(x) is
taken (``autograd.grad(create_graph=True)``), open for the final backward, which therefore carries the KD term's
ordinary gradient plus the explanation term's exact gradient — one student forward, batch-norm running statistics
updated once. ``exact=False`` (``distill.exp_grad = "detached"``) instead detaches the factors in the outer derivative
too: the gradient of the pip ``bcos`` package's explanation mode, kept as a documented ablation.

:func:`fused_layers` runs the same functions, gate always open, for every training forward of a B-cos CNN student
(CE, KD): same values and gradients as the bcos modules, a faster backward. Second-order gradients are supported only
through W(x) — asked for through the training logits, they raise.

Supported: models whose explanation-mode modules are ``BcosConv2d``, ``BatchNormUncentered2d``, ``BcosLinear``,
``DetachableLayerNorm`` and the ViT ``Attention`` of bcos 0.1.3 — every B-cos model gte builds.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair
from bcos.models.vit import Attention
from bcos.modules.bcosconv2d import BcosConv2d, NormedConv2d
from bcos.modules.bcoslinear import BcosLinear
from bcos.modules.common import DetachableModule
from bcos.modules.norms.centered_norms import DetachableLayerNorm
from bcos.modules.norms.uncentered_norms.batchnorm_uncentered import BatchNormUncentered2d

from gte.bcos_kernels import (AvgPool, BatchNormUncentered, BcosScale2, Conv2d, ExplainConstant, ExplainConstantMatmul,
                              Gate)

EXP_GRADS = ("exact", "detached")


def _normed_conv_forward(module: NormedConv2d, gate: Gate, in_tensor: torch.Tensor) -> torch.Tensor:
    """``NormedConv2d.forward`` (unit-norm weights) through :class:`~gte.bcos_kernels.Conv2d`."""
    w = module.weight / torch.linalg.vector_norm(module.weight, dim=(1, 2, 3), keepdim=True)
    device = in_tensor.device.type
    if torch.is_autocast_enabled(device):  # cast here, so that the saved tensors match what the backward gets
        dtype = torch.get_autocast_dtype(device)
        in_tensor, w = in_tensor.to(dtype), w.to(dtype)
    return Conv2d.apply(in_tensor, w, (module.stride, module.padding, module.dilation, module.groups), gate)


def _plain_conv_forward(module: nn.Conv2d, gate: Gate, in_tensor: torch.Tensor) -> torch.Tensor:
    """A B-cosified layer's convolution (:mod:`gte.models.bcosify`: the pretrained weight as it is, not unit-norm)
    through :class:`~gte.bcos_kernels.Conv2d`, as :func:`_normed_conv_forward` without the normalisation."""
    w = module.weight
    device = in_tensor.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        in_tensor, w = in_tensor.to(dtype), w.to(dtype)
    return Conv2d.apply(in_tensor, w, (module.stride, module.padding, module.dilation, module.groups), gate)


def _bcos_forward(module: BcosConv2d | BcosLinear, gate: Gate, norms: Callable[[torch.Tensor], torch.Tensor],
                  in_tensor: torch.Tensor) -> torch.Tensor:
    """``BcosConv2d.forward_impl`` / ``BcosLinear.forward`` (bcos 0.1.3) with the dynamic scaling as an explanation
    constant."""
    out = module.linear(in_tensor)
    if module.max_out > 1:
        dim = 1 if isinstance(module, BcosConv2d) else out.ndim - 1  # channels, then the max-out group
        out = out.unflatten(dim, (out.shape[dim] // module.max_out, module.max_out)).max(dim=dim + 1).values
    if module.b == 1:
        return out
    # at W(x)'s own input the norms depend on nothing trainable and their input gradient is never used
    norm = norms(in_tensor.detach() if in_tensor is gate.input else in_tensor)
    if module.b == 2:
        y = BcosScale2.apply(out, norm, gate)
        gate.scaled = (y, out, norm)  # a batch norm right after can route its double backward to (out, norm)
        return y
    return ExplainConstant.apply(out, ((out / norm).abs() + 1e-6).pow(module.b - 1), gate)


def _linear_norms(in_tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(in_tensor, dim=-1, keepdim=True) + 1e-12


def _bn_uncentered_forward(module: BatchNormUncentered2d, gate: Gate, x: torch.Tensor) -> torch.Tensor:
    """``BatchNormUncentered2d`` in training mode with its batch standard deviation as an explanation constant."""
    if not module.training:  # running statistics: already constants
        return BatchNormUncentered2d.forward(module, x)
    a, n = gate.scaled[1:] if gate.scaled is not None and gate.scaled[0] is x else (None, None)
    y, var = BatchNormUncentered.apply(x, module.weight, module.bias, module.eps, gate, a, n)
    if module.track_running_stats:
        module.num_batches_tracked.add_(1)
        momentum = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
        module.running_var.copy_((1 - momentum) * module.running_var + momentum * var)
    return y


def _layer_norm_forward(module: DetachableLayerNorm, gate: Gate, x: torch.Tensor) -> torch.Tensor:
    """``DetachableLayerNorm``: ``(x − μ) / σ`` with σ an explanation constant (μ is linear in x)."""
    var, mean = torch.var_mean(x, dim=tuple(range(-len(module.normalized_shape), 0)), unbiased=False, keepdim=True)
    y = ExplainConstant.apply(x - mean, (var + module.eps).rsqrt(), gate)
    if module.weight is not None:
        y = module.weight * y
    return y if module.bias is None else y + module.bias


def _attention_forward(module: Attention, gate: Gate, x: torch.Tensor) -> torch.Tensor:
    """The B-cos ViT's attention (bcos 0.1.3) with the attention matrix as an explanation constant."""
    x = module.norm(x)
    q, k, v = (t.unflatten(-1, (module.heads, -1)).transpose(1, 2) for t in module.to_qkv(x).chunk(3, dim=-1))
    attn = module.attend(q @ k.transpose(-1, -2) * module.scale)
    out = ExplainConstantMatmul.apply(attn, v, gate)
    return module.to_out(out.transpose(1, 2).flatten(2))


def _avg_pool_forward(module: nn.AvgPool2d, gate: Gate, x: torch.Tensor) -> torch.Tensor:
    """``nn.AvgPool2d`` through :class:`~gte.bcos_kernels.AvgPool` (batched N×C×H×W input; others as it is)."""
    if x.dim() != 4:
        return nn.AvgPool2d.forward(module, x)
    k = _pair(module.kernel_size)
    args = (k, _pair(module.stride) if module.stride else k, _pair(module.padding), module.ceil_mode,
            module.count_include_pad, module.divisor_override)
    return AvgPool.apply(x, args, gate)


def _plain_normed_conv(m: nn.Module) -> bool:
    return (type(m) is NormedConv2d and m.bias is None and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _plain_conv(m: nn.Module) -> bool:
    """A B-cosified layer's ``linear``: a plain bias-free convolution with zero padding."""
    return type(m) is nn.Conv2d and m.bias is None and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _gated_forward(m: nn.Module, gate: Gate) -> tuple[str, Callable] | None:
    """The attribute to patch on ``m`` and its gated replacement (None: ``m`` runs as it is)."""
    if type(m) is BcosConv2d:
        return "forward_impl", functools.partial(_bcos_forward, m, gate, m.calc_patch_norms)
    if type(m) is BcosLinear:  # bcos 0.1.3's BcosLinear computes in forward (it has no forward_impl)
        return "forward", functools.partial(_bcos_forward, m, gate, _linear_norms)
    if type(m) is BatchNormUncentered2d:
        return "forward", functools.partial(_bn_uncentered_forward, m, gate)
    if type(m) is DetachableLayerNorm:
        return "forward", functools.partial(_layer_norm_forward, m, gate)
    if type(m) is Attention:
        return "forward", functools.partial(_attention_forward, m, gate)
    if type(m) is nn.AvgPool2d:  # no dynamic factor: gated for memory (it keeps no input) and gradient recipes
        return "forward", functools.partial(_avg_pool_forward, m, gate)
    return None


def supports_one_pass(model: nn.Module) -> bool:
    """True for B-cos models whose every explanation-mode module is one this module knows how to gate (exact types:
    a subclass may compute something else)."""
    detachable = [m for m in model.modules() if isinstance(m, DetachableModule)]
    return bool(detachable) and all(_gated_forward(m, Gate()) is not None for m in detachable)


def is_bcos_cnn(model: nn.Module) -> bool:
    """A one-pass B-cos model without attention or layer norms: its CE/KD forward gains from the fused layers."""
    return supports_one_pass(model) and not any(type(m) in (Attention, DetachableLayerNorm) for m in model.modules())


@contextlib.contextmanager
def _gated(model: nn.Module, gate: Gate) -> Iterator[None]:
    patched: list[tuple[nn.Module, str]] = []
    try:
        for m in model.modules():
            found = _gated_forward(m, gate)
            if found is not None:
                setattr(m, *found)
                patched.append((m, found[0]))
            if isinstance(m, BcosConv2d) and _plain_normed_conv(m.linear):
                m.linear.forward = functools.partial(_normed_conv_forward, m.linear, gate)
                patched.append((m.linear, "forward"))
            elif isinstance(m, BcosConv2d) and _plain_conv(m.linear):
                m.linear.forward = functools.partial(_plain_conv_forward, m.linear, gate)
                patched.append((m.linear, "forward"))
        yield
    finally:
        for m, name in patched:
            delattr(m, name)


@contextlib.contextmanager
def fused_layers(model: nn.Module) -> Iterator[None]:
    """Forwards inside run through the gated B-cos layers with the gate always open: the same values and the same
    first-order gradients as the bcos modules, with fewer tensor passes in the backward."""
    with _gated(model, Gate()):
        yield


class OnePass:
    """One gated student forward: ``.logits`` for the training loss, :meth:`explain` for W(x) of any classes (call it
    as often as needed: each call is one double-backward-able input gradient of the same forward).

    Back-propagating ``f(logits) + g(W)`` gives the ordinary parameter gradient for ``f`` plus, for ``g``, the exact
    derivative of ``g(W(θ))`` (``exp_grad="exact"``, the official e2KD gradient) or the one with the dynamic factors
    detached (``"detached"``, pip bcos' explanation mode). ``model`` must pass :func:`supports_one_pass`.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, exp_grad: str = "exact") -> None:
        if exp_grad not in EXP_GRADS:
            raise ValueError(f"exp_grad must be one of {EXP_GRADS}, not {exp_grad!r}")
        self.x = x.detach().requires_grad_(True)
        self.gate = Gate(input=self.x, exact=exp_grad == "exact")
        with torch.enable_grad(), _gated(model, self.gate):
            self.logits = model(self.x)

    def explain(self, classes: torch.Tensor) -> torch.Tensor:
        """W(x) of ``classes`` (one per sample), differentiable in the parameters."""
        with torch.enable_grad():
            target = self.logits.gather(1, classes.to(self.logits.device).long()[:, None]).sum()
            with self.gate.closed():
                (maps,) = torch.autograd.grad(target, self.x, create_graph=True)
        return maps


def logits_and_explanation(
    model: nn.Module, x: torch.Tensor, classes: torch.Tensor, exp_grad: str = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training logits and W(x) of ``classes`` (one per sample), both differentiable, from one forward
    (:class:`OnePass`)."""
    one = OnePass(model, x, exp_grad)
    return one.logits, one.explain(classes)


__all__ = ["EXP_GRADS", "OnePass", "fused_layers", "is_bcos_cnn", "logits_and_explanation",
           "supports_one_pass"]
