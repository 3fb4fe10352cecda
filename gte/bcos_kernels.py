"""Autograd functions for B-cos layers whose dynamic factors are *explanation constants* (see :mod:`gte.onepass`).

A B-cos layer computes ``y = a · s`` where ``a`` is linear in its input and ``s = s(θ, x)`` is a dynamic factor: the
B-cos scaling ``|ŵ·x|^(b-1) / ‖x‖^(b-1)``, an uncentered norm's ``1/σ``, a ViT's attention matrix. W(x), the dynamic
linear map, is the input gradient with every ``s`` held constant. Each function here reads a :class:`Gate` at
*backward* time (the official e2KD code's ``DynamicMultiplication`` does the same with its ``fixed_weights`` flag):

- gate open (ordinary backward, the KD/CE terms and the final backward): the full derivative, ``∂/∂a`` and ``∂/∂s``;
- gate closed (while W(x) is taken with ``autograd.grad(create_graph=True)``): ``∂/∂a = g · s`` only. With
  ``gate.exact`` (the default) ``s`` stays a differentiable function of the forward, so the final backward of the
  explanation loss flows *through* the factors — the exact derivative of ``1 − cos(W_T, W_S(θ))`` in θ, as in the
  official code. With ``exact=False`` (``distill.exp_grad = "detached"``, an ablation) ``s`` is detached there too:
  the gradient of the pip ``bcos`` package's explanation mode, which detaches the factors in the forward pass.

The closed-gate results are themselves differentiable functions with hand-written derivatives
(:mod:`gte.bcos_grads`: the double-backward nodes and what they keep in memory). The unit-norm convolution's input
gradient takes its weight gradient from the native backward-weights kernel (autograd's own conv double backward
computes it as a convolution of batch/channel-transposed tensors, ≈2× slower on CPU here). Average pools
(:class:`AvgPool`) keep their input's shape only: autograd's ``avg_pool2d`` saved the whole input, which its backward
never reads (49 MiB for a B-cos ResNet's first pool at 224², batch 16).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from gte.bcos_grads import (BNGrad, ConvInputGrad, PoolGrad, Recipe, ScaleBNGrad, ScaleGrad, first_order_only,
                            per_channel, pool_input_grad, rsqrt_grad_coef, sum_to, var_grad)


class Gate:
    """Open: ordinary gradients. Closed (while W(x) is taken): input gradients only, the dynamic factors passing none
    — differentiable in the outer derivative when ``exact``, detached otherwise."""

    def __init__(self, input: torch.Tensor | None = None, exact: bool = True) -> None:
        self.open = True
        self.exact = exact
        # the leaf W(x) is taken at: the final backward never needs its gradient, so it is not computed
        self.input = input
        self._noted: tuple[torch.Tensor, Recipe] | None = None
        self.scaled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # last b = 2 layer: (y, a, n)

    def note(self, out: torch.Tensor, recipe: Recipe) -> None:
        """``out``, a closed-gate gradient just produced, can be rebuilt from ``recipe`` (tensors the double-backward
        graph keeps anyway). Its consumer, the next closed backward in the same layer, may then keep the recipe
        instead of ``out``, which is freed once W(x) is taken: one activation-sized tensor less per link."""
        self._noted = (out, recipe)

    def recipe_for(self, g: torch.Tensor) -> Recipe | None:
        """The recipe of ``g`` if ``g`` is the tensor noted last (held alive until now, so equal memory means the
        same tensor), else None. Consumes the note."""
        noted, self._noted = self._noted, None
        if noted is None:
            return None
        out, recipe = noted
        same = (out.data_ptr() == g.data_ptr() and out.shape == g.shape and out.stride() == g.stride()
                and out.dtype == g.dtype and out._version == g._version)
        return recipe if same else None

    @contextlib.contextmanager
    def closed(self) -> Iterator[None]:
        self.open = False
        try:
            yield
        finally:
            self.open, self._noted = True, None

    def factor(self, s: torch.Tensor) -> torch.Tensor:
        """A dynamic factor as the closed-gate backward uses it."""
        return s if self.exact else s.detach()


class ExplainConstant(torch.autograd.Function):
    """``a · s`` with ``s`` a dynamic factor (any broadcastable shape; generic ``b``, norms, the ViT)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, s: torch.Tensor, gate: Gate) -> torch.Tensor:
        ctx.gate = gate
        ctx.save_for_backward(a, s)
        return a * s

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, s = ctx.saved_tensors
        if not ctx.gate.open:
            return g * ctx.gate.factor(s), None, None
        grad_a = g * s.detach() if ctx.needs_input_grad[0] else None
        grad_s = sum_to(g * a.detach(), s.shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_s, None


class ExplainConstantMatmul(torch.autograd.Function):
    """``s @ v`` with the matrix ``s`` a dynamic factor (a B-cos ViT's attention weights)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, v: torch.Tensor, gate: Gate) -> torch.Tensor:
        ctx.gate = gate
        ctx.save_for_backward(s, v)
        return s @ v

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        s, v = ctx.saved_tensors
        if not ctx.gate.open:
            return None, ctx.gate.factor(s).transpose(-1, -2) @ g, None
        grad_s = g @ v.detach().transpose(-1, -2) if ctx.needs_input_grad[0] else None
        grad_v = s.detach().transpose(-1, -2) @ g if ctx.needs_input_grad[1] else None
        return grad_s, grad_v, None


class BcosScale2(torch.autograd.Function):
    """B-cos ``b = 2`` scaling, fused: ``y = a · s`` with ``s = |a| / n`` (``a`` = ŵ·x, ``n`` = patch norm ‖x‖).

    Saves ``a`` and ``n`` only (``s`` and ``y`` are recomputed: one pass each). Open gate:
    ``∂y/∂a = 2s``, ``∂y/∂n = −a·s/n``; closed: ``g · s`` — exact, as one node with the batch norm that follows
    (:class:`~gte.bcos_grads.ScaleBNGrad`) or alone (:class:`~gte.bcos_grads.ScaleGrad`), or with ``s`` detached.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, n: torch.Tensor, gate: Gate) -> torch.Tensor:
        ctx.gate = gate
        ctx.save_for_backward(a, n)
        return a.abs().div_(n).mul_(a)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, n = ctx.saved_tensors
        if not ctx.gate.open:  # W(x): s constant in the input derivative
            if ctx.gate.exact:
                return _closed_scale(ctx.gate, g, a, n), None, None
            return g * a.detach().abs().div_(n.detach()), None, None
        first_order_only()
        s = a.abs().div_(n)
        grad_a = torch.mul(g, s).mul_(2.0) if ctx.needs_input_grad[0] else None
        grad_n = sum_to(s.mul_(a).mul_(g), n.shape).div_(n).neg_() if ctx.needs_input_grad[1] else None
        return grad_a, grad_n, None


def _same(t: torch.Tensor, u: torch.Tensor) -> bool:
    return t.data_ptr() == u.data_ptr() and t.shape == u.shape and t.stride() == u.stride()


def _closed_scale(gate: Gate, g: torch.Tensor, a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The exact closed-gate backward of a b = 2 scaling: fused with the batch norm whose gradient ``g`` is (it noted
    its parts and the same ``a``), else alone; notes how its output is rebuilt for the convolution below."""
    rec = gate.recipe_for(g)
    if rec is not None and rec.bn is not None and _same(rec.bn[5], a):
        g_in, x, weight, r, mean = rec.bn[:5]
        # g, the batch norm's output, passed detached: its node (and what it saved) is not kept
        h = ScaleBNGrad.apply(g_in, a, n, weight, x, r, mean, rec.src if rec.pool else None, rec.pool, g.detach())
        gate.note(h, Recipe(rec.src, rec.scale, a, n, rec.pool))
        return h
    src, scale, pool = (None, None, None) if rec is None else (rec.src, rec.scale, rec.pool)
    h = ScaleGrad.apply(g, a, n, src, scale, pool)
    gate.note(h, Recipe(g if src is None else src, scale, a, n, pool))
    return h


def channel_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch variance (biased) and mean of an N×C×H×W tensor over (N, H, W), in two passes: μ, then the
    mean of (x − μ)². ``torch.var_mean(x, dim=(0, 2, 3))`` gives the same values but its strided reduction was 2–7×
    slower on CPU (1 thread, torch 2.15: 13.6 vs 6.0 ms at 64×16×32², 7.2 vs 1.1 ms at 16×512×7²) — the training
    batch norm of every B-cos CNN step. The deviation buffer lives only inside this call."""
    mean = x.mean((0, 2, 3))
    return (x - per_channel(mean)).square_().mean((0, 2, 3)), mean


class BatchNormUncentered(torch.autograd.Function):
    """Training-mode uncentered batch norm ``y = γ · x · r (+ β)``, ``r = 1/√(Var_batch(x) + ε)``, fused.

    Hand-written backward; gate closed: ``g · γ · r`` with ``r`` an explanation constant — exact through
    :class:`~gte.bcos_grads.BNGrad`, or fused with the b = 2 scaling before it when ``x`` is that scaling's output
    (``a, n`` given: the scaling's closed backward then builds :class:`~gte.bcos_grads.ScaleBNGrad` from what this
    one notes, and the ``BNGrad`` node made here is dropped).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                gate: Gate, a: torch.Tensor | None = None, n: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # statistics in float32 under autocast: a bf16 mean is off by ~2⁻⁹·|μ|, and for the uncentered activations of
        # B-cos networks (|μ| ≫ σ) that offset in x − μ dominates the variance's gradient (its double backward)
        var, mean = channel_var_mean(x if x.dtype in (torch.float32, torch.float64) else x.float())
        r = (var + eps).rsqrt_()
        scale = r if weight is None else r * weight
        y = x * per_channel(scale)
        if bias is not None:
            y.add_(per_channel(bias))
        ctx.gate = gate
        ctx.save_for_backward(x, weight, r, mean, a, n)
        ctx.mark_non_differentiable(var)
        return y, var

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_var: torch.Tensor):
        x, weight, r, mean, a, n = ctx.saved_tensors
        none = (None,) * 6
        if not ctx.gate.open:  # W(x): r constant; γ stays differentiable (its gradient reaches γ in double backprop)
            if ctx.gate.exact:
                rec = ctx.gate.recipe_for(g)  # g an average pool's input gradient: keep the pool's input instead
                pooled = rec is not None and rec.pool is not None and rec.scale is None and rec.a is None
                h = BNGrad.apply(g, x, weight, r, mean)
                scale = r if weight is None else weight.detach() * r
                ctx.gate.note(h, Recipe(rec.src if pooled else g, scale, pool=rec.pool if pooled else None,
                                        bn=None if a is None else (g, x, weight, r, mean, a, n)))
                return h, *none
            return g * per_channel(r if weight is None else weight * r), *none
        first_order_only()
        gx = (g * x).sum((0, 2, 3))  # Σ g·x per channel
        grad_w = gx * r if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = g.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = 1.0 if weight is None else weight
            grad_x = var_grad(x, mean, rsqrt_grad_coef(gx, w, r, x))
            grad_x.addcmul_(g, per_channel(w * r))
        return grad_x, grad_w, grad_b, *none[:4]


class AvgPool(torch.autograd.Function):
    """``avg_pool2d`` that keeps only its input's shape (its input gradient needs no values); gate closed: the input
    gradient as a differentiable :class:`~gte.bcos_grads.PoolGrad`, noted so that the layer below keeps ``g`` (the
    smaller, pooled side) instead of its output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, args: tuple, gate: Gate) -> torch.Tensor:
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        ctx.gate, ctx.pool = gate, (tuple(x.shape), channels_last, *args)
        return F.avg_pool2d(x, *args)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if not ctx.gate.open:
            h = PoolGrad.apply(g, ctx.pool)
            if ctx.gate.exact:
                ctx.gate.note(h, Recipe(g, pool=ctx.pool))
            return h, None, None
        first_order_only()
        return pool_input_grad(g, ctx.pool), None, None


class Conv2d(torch.autograd.Function):
    """``conv2d(x, w)`` whose input gradient is :class:`~gte.bcos_grads.ConvInputGrad`, so that double backprop
    through W(x) gets the weight gradient from the native backward-weights kernel. Gate closed: input gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, conv: tuple, gate: Gate) -> torch.Tensor:
        ctx.conv, ctx.gate, ctx.at_input = conv, gate, x is gate.input
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w, None, *conv)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        if not ctx.gate.open:
            rec = ctx.gate.recipe_for(g) if ctx.gate.exact else None
            recipe = (None,) * 5 if rec is None else (rec.src, rec.scale, rec.a, rec.n, rec.pool)
            return ConvInputGrad.apply(g, x, w, ctx.conv, *recipe), None, None, None
        first_order_only()
        stride, padding, dilation, groups = ctx.conv
        need_x = ctx.needs_input_grad[0] and not ctx.at_input
        gx, gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0],
                                                         groups, [need_x, ctx.needs_input_grad[1], False])
        return gx, gw, None, None
