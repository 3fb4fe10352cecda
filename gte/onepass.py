"""A B-cos student's training logits and its explanation W(x) from ONE forward pass.

e2KD needs two different derivatives of the same student forward:

- the KD (and CE) term wants the true parameter gradient of the logits, through the dynamic scaling and the
  batch-norm statistics;
- W(x) is the input gradient in the bcos package's *explanation mode*, where the dynamic scaling ``|ŵ·x|/‖x‖`` and the
  batch-norm standard deviation are detached (treated as constants); the explanation loss is then back-propagated
  through that gradient (double backprop), again with those factors constant.

The forward values are identical in both cases; only the backward differs. Here every such factor ``s`` enters its
product through :class:`_ExplainConstant`: forward ``a · s``; backward ``∂/∂a = g · s`` with ``s`` detached (so the
double backward, like explanation mode, never differentiates ``s``), and ``∂/∂s = g · a`` only while the gate is open.
The gate is closed while W(x) is taken (``autograd.grad(create_graph=True)``) and open for the final backward, which
therefore carries the KD term's exact gradient plus the explanation term's explanation-mode gradient: the same
parameter gradient as a normal forward for the logits plus a second forward in explanation mode — one student
forward cheaper, and batch-norm running statistics are updated once. Checked against that two-pass formulation and
against bcos' own explanation mode in ``tests/test_onepass.py``.

The b = 2 scaling and the batch norm are fused autograd functions with hand-written backward formulas (fewer tensor
passes than autograd's chain of abs/div/var/mul), and the unit-norm convolution's input gradient is itself a function
whose backward (the double backward) uses the native weight-gradient kernel. :func:`fused_layers` uses them, gate
always open, for every training forward of a B-cos CNN student (CE, KD): same values and gradients as the bcos
modules, a faster backward. With the gate closed only input gradients are produced (all W(x) needs); second-order
gradients are supported only through W(x) — asked for through the training logits, they raise.

Supported: models whose only explanation-mode modules are ``BcosConv2d`` (any ``b``, max-out) and
``BatchNormUncentered2d`` — all of gte's B-cos CNNs. Others (the B-cos ViT) use the two-pass formulation.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from bcos.modules.bcosconv2d import BcosConv2d, NormedConv2d
from bcos.modules.common import DetachableModule
from bcos.modules.norms.uncentered_norms.batchnorm_uncentered import (
    BatchNormUncentered2d,
)


class Gate:
    """Open: ordinary gradients. Closed (while W(x) is taken): input gradients only, the explanation-constant factors
    passing none."""

    def __init__(self, input: torch.Tensor | None = None) -> None:
        self.open = True
        # the leaf W(x) is taken at: the final backward never needs its gradient, so it is not computed
        self.input = input

    @contextlib.contextmanager
    def closed(self) -> Iterator[None]:
        self.open = False
        try:
            yield
        finally:
            self.open = True


class _ExplainConstant(torch.autograd.Function):
    """``a · s`` where ``s`` is a constant for the explanation (see the module docstring)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, s: torch.Tensor, gate: Gate) -> torch.Tensor:
        ctx.gate = gate
        ctx.save_for_backward(a, s)
        return a * s

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, s = ctx.saved_tensors
        grad_a = g * s.detach() if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.gate.open and ctx.needs_input_grad[1]:
            grad_s = g * a.detach()
            if grad_s.shape != s.shape:  # s was broadcast (per-pixel norms, per-channel std)
                dims = [i for i, (n, m) in enumerate(zip(grad_s.shape, s.shape)) if m == 1 and n != 1]
                grad_s = grad_s.sum(dims, keepdim=True)
        return grad_a, grad_s, None


class _BcosScale2(torch.autograd.Function):
    """B-cos ``b = 2`` scaling, fused: ``y = a · s`` with ``s = |a| / n`` (``a`` = ŵ·x, ``n`` = patch norm ‖x‖).

    Hand-written backward (a few tensor passes instead of autograd's chain through abs, div and mul):
    ``∂y/∂a = 2s``, ``∂y/∂n = −y/n``; gate closed: ``g · s`` only (``s`` an explanation constant).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, n: torch.Tensor, gate: Gate) -> torch.Tensor:
        s = a.abs().div_(n)
        y = a * s
        ctx.gate = gate
        ctx.save_for_backward(s, n, y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        s, n, y = ctx.saved_tensors
        if not ctx.gate.open:  # W(x): differentiable in g (double backprop), s constant
            return g * s, None, None
        _first_order_only()
        grad_a = torch.mul(g, s).mul_(2.0) if ctx.needs_input_grad[0] else None
        grad_n = (g * y).sum(1, keepdim=True).div_(n).neg_() if ctx.needs_input_grad[1] else None
        return grad_a, grad_n, None


class _BatchNormUncentered(torch.autograd.Function):
    """Training-mode uncentered batch norm ``y = γ · x / √(Var_batch(x) + ε) (+ β)``, fused.

    Hand-written backward; gate closed: ``g · γ / σ`` with σ constant (explanation mode), still differentiable in γ.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                gate: Gate) -> tuple[torch.Tensor, torch.Tensor]:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        r = (var + eps).rsqrt_()
        scale = r if weight is None else r * weight
        y = x * scale[None, :, None, None]
        if bias is not None:
            y.add_(bias[None, :, None, None])
        ctx.gate = gate
        ctx.save_for_backward(x, weight, r, mean)
        ctx.mark_non_differentiable(var)
        return y, var

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_var: torch.Tensor):
        x, weight, r, mean = ctx.saved_tensors
        if not ctx.gate.open:  # W(x): σ constant; γ stays differentiable (its gradient reaches γ in double backprop)
            scale = r if weight is None else weight * r
            return g * scale[None, :, None, None], None, None, None, None
        _first_order_only()
        gx = (g * x).sum((0, 2, 3))  # Σ g·x per channel
        grad_w = gx * r if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = g.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = 1.0 if weight is None else weight
            m = x.numel() // x.shape[1]
            c = -(w * gx * r.pow(3)) / m  # ∂L/∂Var · ∂Var/∂x = c · (x − μ)
            grad_x = torch.addcmul((-c * mean)[None, :, None, None], x, c[None, :, None, None])
            grad_x.addcmul_(g, (w * r)[None, :, None, None])
        return grad_x, grad_w, grad_b, None, None


class _Conv2d(torch.autograd.Function):
    """``conv2d(x, w)`` whose input gradient is :class:`_ConvInputGrad`, so that double backprop through W(x) gets the
    weight gradient from the native backward-weights kernel (autograd's own conv double backward computes it as a
    convolution of batch/channel-transposed tensors, ≈2× slower on CPU here). Gate closed: input gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, conv: tuple, gate: Gate) -> torch.Tensor:
        ctx.conv, ctx.gate, ctx.at_input = conv, gate, x is gate.input
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w, None, *conv)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        if not ctx.gate.open:
            return _ConvInputGrad.apply(g, x, w, ctx.conv), None, None, None
        _first_order_only()
        stride, padding, dilation, groups = ctx.conv
        need_x = ctx.needs_input_grad[0] and not ctx.at_input
        gx, gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0],
                                                         groups, [need_x, ctx.needs_input_grad[1], False])
        return gx, gw, None, None


class _ConvInputGrad(torch.autograd.Function):
    """∂conv2d(x, w)/∂x applied to ``g`` (a transposed convolution), differentiable in ``g`` and ``w``."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conv: tuple) -> torch.Tensor:
        ctx.conv = conv
        ctx.save_for_backward(g, x, w)
        stride, padding, dilation, groups = conv
        return torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0], groups,
                                                   [True, False, False])[0]

    @staticmethod
    def backward(ctx, gg: torch.Tensor):
        g, _, w = ctx.saved_tensors
        _first_order_only()
        stride, padding, dilation, groups = ctx.conv
        grad_g = F.conv2d(gg, w, None, *ctx.conv) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[2]:  # <g, conv(gg, w)> is linear in w: the weight gradient of conv(gg, ·) at g
            grad_w = torch.ops.aten.convolution_backward(g, gg, w, None, stride, padding, dilation, False, [0, 0],
                                                         groups, [False, True, False])[1]
        return grad_g, None, grad_w, None


def _normed_conv_forward(module: NormedConv2d, gate: Gate, in_tensor: torch.Tensor) -> torch.Tensor:
    """``NormedConv2d.forward`` (unit-norm weights) through :class:`_Conv2d`."""
    w = module.weight / torch.linalg.vector_norm(module.weight, dim=(1, 2, 3), keepdim=True)
    device = in_tensor.device.type
    if torch.is_autocast_enabled(device):  # cast here, so that the saved tensors match what the backward gets
        dtype = torch.get_autocast_dtype(device)
        in_tensor, w = in_tensor.to(dtype), w.to(dtype)
    return _Conv2d.apply(in_tensor, w, (module.stride, module.padding, module.dilation, module.groups), gate)


def _first_order_only() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError("gte.onepass: second-order gradients of the training logits are not supported "
                           "(only W(x) is differentiable twice)")


def _bcos_conv_forward(module: BcosConv2d, gate: Gate, in_tensor: torch.Tensor) -> torch.Tensor:
    """``BcosConv2d.forward_impl`` (bcos 0.1.3) with the dynamic scaling as an explanation constant."""
    out = module.linear(in_tensor)
    if module.max_out > 1:
        out = out.unflatten(dim=1, sizes=(module.out_channels, module.max_out)).max(dim=2, keepdim=False).values
    if module.b == 1:
        return out
    # at W(x)'s own input the norms never need a gradient (constant for W(x), input gradient unused afterwards)
    norm = module.calc_patch_norms(in_tensor.detach() if in_tensor is gate.input else in_tensor)
    if module.b == 2:
        return _BcosScale2.apply(out, norm, gate)
    scaling = ((out / norm).abs() + 1e-6).pow(module.b - 1)
    return _ExplainConstant.apply(out, scaling, gate)


def _bn_uncentered_forward(module: BatchNormUncentered2d, gate: Gate, x: torch.Tensor) -> torch.Tensor:
    """``BatchNormUncentered2d`` in training mode with its batch standard deviation as an explanation constant."""
    if not module.training:  # running statistics: already constants
        return BatchNormUncentered2d.forward(module, x)
    y, var = _BatchNormUncentered.apply(x, module.weight, module.bias, module.eps, gate)
    if module.track_running_stats:
        module.num_batches_tracked.add_(1)
        momentum = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
        module.running_var.copy_((1 - momentum) * module.running_var + momentum * var)
    return y


def _plain_normed_conv(m: nn.Module) -> bool:
    return (type(m) is NormedConv2d and m.bias is None and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def supports_one_pass(model: nn.Module) -> bool:
    """True for B-cos models whose every explanation-mode module is one this module knows how to gate."""
    found = False
    for m in model.modules():
        if isinstance(m, DetachableModule):
            if isinstance(m, BcosConv2d) and type(m).forward_impl is BcosConv2d.forward_impl:
                found = True
            elif not (isinstance(m, BatchNormUncentered2d) and type(m).forward is BatchNormUncentered2d.forward):
                return False
    return found


@contextlib.contextmanager
def _gated(model: nn.Module, gate: Gate) -> Iterator[None]:
    patched: list[tuple[nn.Module, str]] = []
    try:
        for m in model.modules():
            if isinstance(m, BcosConv2d):
                m.forward_impl = functools.partial(_bcos_conv_forward, m, gate)
                patched.append((m, "forward_impl"))
                if _plain_normed_conv(m.linear):
                    m.linear.forward = functools.partial(_normed_conv_forward, m.linear, gate)
                    patched.append((m.linear, "forward"))
            elif isinstance(m, BatchNormUncentered2d):
                m.forward = functools.partial(_bn_uncentered_forward, m, gate)
                patched.append((m, "forward"))
        yield
    finally:
        for m, name in patched:
            delattr(m, name)


@contextlib.contextmanager
def fused_layers(model: nn.Module) -> Iterator[None]:
    """Forwards inside run through the fused B-cos layers with the gate always open: the same values and the same
    first-order gradients as the bcos modules, with fewer tensor passes in the backward."""
    with _gated(model, Gate()):
        yield


def logits_and_explanation(
    model: nn.Module, x: torch.Tensor, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training logits and W(x) of ``classes`` (one per sample), both differentiable, from one forward.

    Back-propagating ``f(logits) + g(W)`` gives the parameter gradient of a normal forward for ``f`` plus that of
    explanation mode with ``create_graph=True`` for ``g``. ``model`` must pass :func:`supports_one_pass`.
    """
    x = x.detach().requires_grad_(True)
    gate = Gate(input=x)
    with torch.enable_grad():
        with _gated(model, gate):
            logits = model(x)
        target = logits.gather(1, classes.to(logits.device).long()[:, None]).sum()
        with gate.closed():
            (maps,) = torch.autograd.grad(target, x, create_graph=True)
    return logits, maps
