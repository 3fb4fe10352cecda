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

The closed-gate results of the b = 2 scaling and of the batch norm are themselves functions (:class:`_ScaleGrad`,
:class:`_BNGrad`) with hand-written derivatives in ``g``, ``a``/``x`` and the weight: the double backward recomputes
``|a|/n`` or uses the saved ``1/σ`` instead of keeping autograd's chain of abs/div/var. The unit-norm convolution's
input gradient (:class:`_ConvInputGrad`) takes its weight gradient from the native backward-weights kernel (autograd's
own conv double backward computes it as a convolution of batch/channel-transposed tensors, ≈2× slower on CPU here).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F


class Gate:
    """Open: ordinary gradients. Closed (while W(x) is taken): input gradients only, the dynamic factors passing none
    — differentiable in the outer derivative when ``exact``, detached otherwise."""

    def __init__(self, input: torch.Tensor | None = None, exact: bool = True) -> None:
        self.open = True
        self.exact = exact
        # the leaf W(x) is taken at: the final backward never needs its gradient, so it is not computed
        self.input = input
        self._noted: tuple[torch.Tensor, tuple] | None = None
        self.scaled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # last b = 2 layer: (y, a, n)

    def note(self, out: torch.Tensor, recipe: tuple) -> None:
        """``out``, a closed-gate gradient just produced, can be rebuilt from ``recipe`` (tensors the double-backward
        graph keeps anyway). Its consumer, the next closed backward in the same layer, may then keep the recipe
        instead of ``out``, which is freed once W(x) is taken: one activation-sized tensor less per link."""
        self._noted = (out, recipe)

    def recipe_for(self, g: torch.Tensor) -> tuple | None:
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


def first_order_only() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError("gte.onepass: second-order gradients of the training logits are not supported "
                           "(only W(x) is differentiable twice)")


def sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce ``t`` over the dimensions it was broadcast along to reach ``shape``."""
    dims = [i for i, (n, m) in enumerate(zip(t.shape, shape)) if m == 1 and n != 1]
    return t.sum(dims, keepdim=True) if dims else t


_SLICES = 8  # the double backward's elementwise temporaries are built an eighth of the batch at a time


def _slices(*ts: torch.Tensor) -> zip:
    """Views of ``ts`` over the same ≤ 8 slices of the batch (dimension 0)."""
    return zip(*(t.chunk(_SLICES) for t in ts))


def _sum_prod_to(u: torch.Tensor, v: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``sum_to(u · v, shape)``, the product formed one slice of the batch at a time (where ``shape`` keeps the batch
    dimension): a temporary of an eighth of an activation instead of a whole one."""
    if shape[0] != u.shape[0] or u.shape[0] == 1:
        return sum_to(u * v, shape)
    return torch.cat([sum_to(ui * vi, (len(ui), *shape[1:])) for ui, vi in _slices(u, v)])


def _channel_dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Σ_{n,h,w} u · v`` per channel, one slice of the batch at a time."""
    return sum((ui * vi).sum((0, 2, 3)) for ui, vi in _slices(u, v))


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
    ``∂y/∂a = 2s``, ``∂y/∂n = −a·s/n``; closed: ``g · s`` through :class:`_ScaleGrad` (exact) or with ``s`` detached.
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
                src, scale = ctx.gate.recipe_for(g) or (None, None)
                h = _ScaleGrad.apply(g, a, n, src, scale)
                ctx.gate.note(h, (g if src is None else src, scale, a, n))
                return h, None, None
            return g * a.detach().abs().div_(n.detach()), None, None
        first_order_only()
        s = a.abs().div_(n)
        grad_a = torch.mul(g, s).mul_(2.0) if ctx.needs_input_grad[0] else None
        grad_n = sum_to(s.mul_(a).mul_(g), n.shape).div_(n).neg_() if ctx.needs_input_grad[1] else None
        return grad_a, grad_n, None


def _scaled(g: torch.Tensor, a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``g · |a| / n``: the b = 2 layer's closed-gate gradient (also when rebuilt: the same expression, same bits)."""
    return a.abs().div_(n).mul_(g)


def _bn_scaled(g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``g · γr`` per channel: the batch norm's closed-gate gradient (also when rebuilt)."""
    return g * _c(scale)


def _rebuild(src: torch.Tensor, scale: torch.Tensor | None, a: torch.Tensor | None = None,
             n: torch.Tensor | None = None) -> torch.Tensor:
    """A gradient noted by :meth:`Gate.note`: ``src``, times the batch norm's ``γr`` and/or the scaling's ``|a|/n``."""
    g = src if scale is None else _bn_scaled(src, scale)
    return g if a is None else _scaled(g, a, n)


class _ScaleGrad(torch.autograd.Function):
    """``h = g · |a| / n`` (the closed-gate backward of :class:`BcosScale2`), differentiable in ``g``, ``a``, ``n``:
    ``∂h/∂g = |a|/n``, ``∂h/∂a = g·sign(a)/n``, ``∂h/∂n = −g·|a|/n²``. With ``src`` (``g`` = ``src · scale`` per
    channel, from the batch norm that follows the layer) it keeps ``src`` instead of ``g``."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, a: torch.Tensor, n: torch.Tensor, src: torch.Tensor | None,
                scale: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(g if src is None else src, a, n, scale)
        return _scaled(g, a, n)

    @staticmethod
    def backward(ctx, gh: torch.Tensor):
        src, a, n, scale = ctx.saved_tensors
        first_order_only()
        # two activation-sized buffers besides gh (was five): grad_a = gh·g·sign(a)/n is built in one buffer, g rebuilt
        # into it in place; ∂h/∂n then is −Σ_c grad_a·a / n (sign(a)·a = |a|)
        grad_a = grad_n = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_a = a.sign().mul_(src)  # sign(a)·g·gh: the same bits as sign(a)·(g·gh), ±1 products being exact
            if scale is not None:
                grad_a.mul_(_c(scale))
            grad_a.mul_(gh).div_(n)
            if ctx.needs_input_grad[2]:
                grad_n = _sum_prod_to(grad_a, a, n.shape).div_(n).neg_()
        grad_g = a.abs().div_(n).mul_(gh) if ctx.needs_input_grad[0] else None
        return grad_g, grad_a if ctx.needs_input_grad[1] else None, grad_n, None, None


def _c(t: torch.Tensor) -> torch.Tensor:
    """A per-channel vector broadcast over N×C×H×W."""
    return t[None, :, None, None]


def channel_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch variance (biased) and mean of an N×C×H×W tensor over (N, H, W), in two passes: μ, then the
    mean of (x − μ)². ``torch.var_mean(x, dim=(0, 2, 3))`` gives the same values but its strided reduction was 2–7×
    slower on CPU (1 thread, torch 2.15: 13.6 vs 6.0 ms at 64×16×32², 7.2 vs 1.1 ms at 16×512×7²) — the training
    batch norm of every B-cos CNN step. The deviation buffer lives only inside this call."""
    mean = x.mean((0, 2, 3))
    return (x - _c(mean)).square_().mean((0, 2, 3)), mean


class BatchNormUncentered(torch.autograd.Function):
    """Training-mode uncentered batch norm ``y = γ · x · r (+ β)``, ``r = 1/√(Var_batch(x) + ε)``, fused.

    Hand-written backward; gate closed: ``g · γ · r`` with ``r`` an explanation constant (:class:`_BNGrad` when exact).
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
        y = x * _c(scale)
        if bias is not None:
            y.add_(_c(bias))
        ctx.gate = gate
        ctx.save_for_backward(x, weight, r, mean, a, n)
        ctx.mark_non_differentiable(var)
        return y, var

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_var: torch.Tensor):
        x, weight, r, mean, a, n = ctx.saved_tensors
        if not ctx.gate.open:  # W(x): r constant; γ stays differentiable (its gradient reaches γ in double backprop)
            if ctx.gate.exact:
                h = _BNGrad.apply(g, x, weight, r, mean, a, n)
                ctx.gate.note(h, (g, r if weight is None else weight.detach() * r))
                return h, None, None, None, None, None, None
            return g * _c(r if weight is None else weight * r), None, None, None, None, None, None
        first_order_only()
        gx = (g * x).sum((0, 2, 3))  # Σ g·x per channel
        grad_w = gx * r if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = g.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = 1.0 if weight is None else weight
            grad_x = _var_grad(x, mean, -(w * gx * r.pow(3)) / (x.numel() // x.shape[1]))
            grad_x.addcmul_(g, _c(w * r))
        return grad_x, grad_w, grad_b, None, None, None, None


def _var_grad(x: torch.Tensor, mean: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c · (x − μ)`` per channel: the input gradient through a batch variance, ``∂Var/∂x = 2(x − μ)/M``."""
    return torch.addcmul(_c(-c * mean), x, _c(c))


class _BNGrad(torch.autograd.Function):
    """``h = g · γ · r(x)`` (the closed-gate backward of :class:`BatchNormUncentered`), differentiable in ``g``, ``x``
    and ``γ``: ``∂r/∂x = −r³ (x − μ) / M`` per channel (M = N·H·W). ``r`` and ``μ`` are passed as values.

    With ``a, n`` (``x`` is a b = 2 layer's output ``a·|a|/n``) the gradient in ``x`` goes straight to ``a`` and ``n``
    (``∂x/∂a = 2|a|/n``, ``∂x/∂n = −x/n``): the final backward then sums it into ``a``'s gradient, which that layer
    receives anyway, instead of holding one more activation-sized buffer for ``x`` until the ordinary backward
    reaches the layer."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, r: torch.Tensor,
                mean: torch.Tensor, a: torch.Tensor | None, n: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(g, x, weight, r, mean, a, n)
        return _bn_scaled(g, r if weight is None else weight.detach() * r)

    @staticmethod
    def backward(ctx, gh: torch.Tensor):
        g, x, weight, r, mean, a, n = ctx.saved_tensors
        first_order_only()
        w = 1.0 if weight is None else weight
        t = _channel_dot(gh, g)
        grad_w = t * r if weight is not None and ctx.needs_input_grad[2] else None
        grad_x = grad_a = grad_n = None
        if ctx.needs_input_grad[1] or a is not None:
            grad_x = _var_grad(x, mean, -(w * t * r.pow(3)) / (x.numel() // x.shape[1]))
        if a is not None:  # through x = a·|a|/n, in grad_x's buffer
            grad_n = _sum_prod_to(grad_x, x, n.shape).div_(n).neg_()
            for gi, ai, ni in _slices(grad_x, a, n):
                gi.mul_(ai.abs().div_(ni))
            grad_a, grad_x = grad_x.mul_(2.0), None
        # last: while grad_x / grad_a is built, gh is the only other activation-sized tensor alive
        grad_g = gh * _c(w * r) if ctx.needs_input_grad[0] else None
        return grad_g, grad_x, grad_w, None, None, grad_a, grad_n


class Conv2d(torch.autograd.Function):
    """``conv2d(x, w)`` whose input gradient is :class:`_ConvInputGrad`, so that double backprop through W(x) gets the
    weight gradient from the native backward-weights kernel. Gate closed: input gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, conv: tuple, gate: Gate) -> torch.Tensor:
        ctx.conv, ctx.gate, ctx.at_input = conv, gate, x is gate.input
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w, None, *conv)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        if not ctx.gate.open:
            recipe = (ctx.gate.recipe_for(g) if ctx.gate.exact else None) or ()
            return _ConvInputGrad.apply(g, x, w, ctx.conv, *recipe, *(None,) * (4 - len(recipe))), None, None, None
        first_order_only()
        stride, padding, dilation, groups = ctx.conv
        need_x = ctx.needs_input_grad[0] and not ctx.at_input
        gx, gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0],
                                                         groups, [need_x, ctx.needs_input_grad[1], False])
        return gx, gw, None, None


class _ConvInputGrad(torch.autograd.Function):
    """∂conv2d(x, w)/∂x applied to ``g`` (a transposed convolution), differentiable in ``g`` and ``w``. With a recipe
    (``g`` noted by the scaling above it) it keeps the recipe's tensors instead of ``g`` and rebuilds ``g`` for its
    weight gradient (two elementwise passes instead of an activation-sized tensor held until the final backward)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conv: tuple, src: torch.Tensor | None,
                scale: torch.Tensor | None, a: torch.Tensor | None, n: torch.Tensor | None) -> torch.Tensor:
        ctx.conv = conv
        ctx.save_for_backward(w, *((g, None, None, None) if src is None else (src, scale, a, n)))
        stride, padding, dilation, groups = conv
        return torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0], groups,
                                                   [True, False, False])[0]

    @staticmethod
    def backward(ctx, gg: torch.Tensor):
        w, src, scale, a, n = ctx.saved_tensors
        first_order_only()
        stride, padding, dilation, groups = ctx.conv
        grad_w = None
        if ctx.needs_input_grad[2]:  # <g, conv(gg, w)> is linear in w: the weight gradient of conv(gg, ·) at g
            g = _rebuild(src, scale, *((None, None) if a is None else (a.detach(), n.detach())))
            grad_w = torch.ops.aten.convolution_backward(g, gg, w, None, stride, padding, dilation, False, [0, 0],
                                                         groups, [False, True, False])[1]
            del g  # before grad_g is allocated
        grad_g = F.conv2d(gg, w, None, *ctx.conv) if ctx.needs_input_grad[0] else None
        return grad_g, None, grad_w, None, None, None, None, None
