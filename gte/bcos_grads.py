"""The double-backward nodes of W(x): closed-gate gradients of the B-cos layers as differentiable functions.

While W(x) is taken (``autograd.grad(create_graph=True)``, gate closed; :mod:`gte.bcos_kernels`), each layer's
backward passes ``h = g · s`` on with its dynamic factor ``s`` held constant for the input derivative but still a
function of the forward for the outer one (the official e2KD gradient). These functions compute ``h`` and, in the
final backward, its derivatives in ``g``, in the layer's forward tensors and in its weight, by hand: the scaling's
``|a|/n`` is recomputed, the batch norm's ``1/σ`` read from its forward, instead of keeping autograd's chains of
abs/div/var.

Memory (B-cos ResNet-18, 224², batch 16, fp32; torch profiler's CPU allocation events, one e2KD step):

- **Recipes.** A closed-gate gradient that its consumer in the same layer needs again in the final backward is
  noted with a :class:`Recipe` — how to rebuild it from tensors the graph keeps anyway (the gradient that entered the
  layer, the batch norm's ``γr``, the scaling's ``a`` and ``n``, an average pool's geometry). The consumer keeps the
  recipe instead of the tensor: one activation-sized tensor per layer kept (the gradient entering the layer) instead
  of three or four.
- **The scaling and its batch norm are one node** (:class:`_ScaleBNGrad`, for every b = 2 layer followed by an
  uncentered batch norm): ``h = |a|/n · γ r(x) · g`` with ``x = a|a|/n``. The two nodes it replaces each held an
  input and an output gradient and left two gradients of ``a`` to be summed; one node leaves one. −49 MiB at the
  step's peak, which is the final backward at the first layer (112², 64 channels: 49 MiB per tensor).
- **Few temporaries.** Each backward builds its outputs in place and forms elementwise products one slice of the
  batch at a time (``_slices``): the first layer's nodes held five activation-sized temporaries (245 MiB), now two.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# elementwise temporaries are formed a slice of the batch at a time: slices of about this many elements (8 MiB of
# fp32), at most 8 — small layers in one piece (each slice is one more op to launch)
_SLICE_NUMEL = 1 << 21
_MAX_SLICES = 8


def first_order_only() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError("gte.onepass: second-order gradients of the training logits are not supported "
                           "(only W(x) is differentiable twice)")


def sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce ``t`` over the dimensions it was broadcast along to reach ``shape``."""
    dims = [i for i, (n, m) in enumerate(zip(t.shape, shape)) if m == 1 and n != 1]
    return t.sum(dims, keepdim=True) if dims else t


def per_channel(t: torch.Tensor) -> torch.Tensor:
    """A per-channel vector broadcast over N×C×H×W."""
    return t[None, :, None, None]


def _slices(*ts: torch.Tensor) -> zip:
    """Views of ``ts`` over the same slices of the batch (dimension 0), as many as the first one's size asks."""
    n = min(_MAX_SLICES, len(ts[0]), -(-ts[0].numel() // _SLICE_NUMEL))
    return zip(*(t.chunk(n) for t in ts))


def _sum_prod_to(u: torch.Tensor, v: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``sum_to(u · v, shape)``, the product formed one slice of the batch at a time where ``shape`` keeps the batch
    dimension (a temporary of a slice instead of a whole activation)."""
    if shape[0] != u.shape[0] or u.shape[0] == 1:
        return sum_to(u * v, shape)
    return torch.cat([sum_to(ui * vi, (len(ui), *shape[1:])) for ui, vi in _slices(u, v)])


def var_grad(x: torch.Tensor, mean: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c · (x − μ)`` per channel: the input gradient through a batch variance, ``∂Var/∂x = 2(x − μ)/M``."""
    return torch.addcmul(per_channel(-c * mean), x, per_channel(c))


def rsqrt_grad_coef(t: torch.Tensor, w: torch.Tensor | float, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``c`` with ``Σ ∂(γ r)/∂x · t = c · (x − μ)``: ``c = −γ t r³ / M`` per channel (M = N·H·W)."""
    return -(w * t * r.pow(3)) / (x.numel() // x.shape[1])


# ------------------------------------------------------------------------------------------------ recipes
class Recipe(NamedTuple):
    """How to rebuild a closed-gate gradient (:meth:`gte.bcos_kernels.Gate.note`): ``src``, through an average
    pool's input gradient (``pool``: its geometry), times a batch norm's ``γr`` per channel (``scale``), times a b = 2
    scaling's ``|a|/n``. ``bn``: ``(x, weight, r, mean, a, n)`` of the batch norm that produced it, for the scaling
    before it (:class:`_ScaleBNGrad`)."""

    src: torch.Tensor
    scale: torch.Tensor | None = None
    a: torch.Tensor | None = None
    n: torch.Tensor | None = None
    pool: tuple | None = None
    bn: tuple | None = None


def pool_input_grad(g: torch.Tensor, pool: tuple) -> torch.Tensor:
    """The input gradient of ``avg_pool2d`` (``pool`` = input shape, channels-last flag, kernel, stride, padding,
    ceil_mode, count_include_pad, divisor_override): the input is needed for its shape only."""
    shape, channels_last, *args = pool
    like = g.new_empty(()).expand(shape)  # no memory
    if not channels_last:
        return torch.ops.aten.avg_pool2d_backward(g, like, *args)
    out = torch.empty(shape, dtype=g.dtype, device=g.device, memory_format=torch.channels_last)
    return torch.ops.aten.avg_pool2d_backward.grad_input(g, like, *args, grad_input=out)


def _scaled(g: torch.Tensor, a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``g · |a| / n``: the b = 2 layer's closed-gate gradient (also when rebuilt: the same expression, same bits)."""
    return a.abs().div_(n).mul_(g)


def bn_scaled(g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``g · γr`` per channel: the batch norm's closed-gate gradient (also when rebuilt)."""
    return g * per_channel(scale)


def _scale_(h: torch.Tensor, a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``h ·= |a| / n`` in place, one slice of the batch at a time (the bits of :func:`_scaled`)."""
    for hi, ai, ni in _slices(h, a, n):
        hi.mul_(ai.abs().div_(ni))
    return h


def rebuild(src: torch.Tensor, scale: torch.Tensor | None = None, a: torch.Tensor | None = None,
            n: torch.Tensor | None = None, pool: tuple | None = None) -> torch.Tensor:
    """A noted gradient from its :class:`Recipe` — the same operations as when it was made, so the same bits; one
    activation-sized allocation at most."""
    g = src if pool is None else pool_input_grad(src, pool)
    if scale is not None:
        g = bn_scaled(g, scale) if g is src else g.mul_(per_channel(scale))
    if a is None:
        return g
    return _scaled(g, a, n) if g is src else _scale_(g, a, n)


# ------------------------------------------------------------------------------------------------ nodes
class PoolGrad(torch.autograd.Function):
    """``h = avg_pool2d``'s input gradient of ``g`` (linear in ``g``; its derivative is the pool itself)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, pool: tuple) -> torch.Tensor:
        ctx.pool = pool
        return pool_input_grad(g, pool)

    @staticmethod
    def backward(ctx, gh: torch.Tensor):
        first_order_only()
        kernel, stride, padding, ceil_mode, count_include_pad, divisor = ctx.pool[2:]
        return F.avg_pool2d(gh, kernel, stride, padding, ceil_mode, count_include_pad, divisor), None


class ScaleGrad(torch.autograd.Function):
    """``h = g · |a| / n`` (the closed-gate backward of a b = 2 scaling not followed by its batch norm),
    differentiable in ``g``, ``a``, ``n``: ``∂h/∂g = |a|/n``, ``∂h/∂a = g·sign(a)/n``, ``∂h/∂n = −g·|a|/n²``.
    With a recipe for ``g`` (``src``, ``scale``, ``pool``) it keeps the recipe's tensors instead of ``g``."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, a: torch.Tensor, n: torch.Tensor, src: torch.Tensor | None,
                scale: torch.Tensor | None, pool: tuple | None) -> torch.Tensor:
        ctx.pool = pool
        ctx.save_for_backward(g if src is None else src, scale, a, n)
        return _scaled(g, a, n)

    @staticmethod
    def backward(ctx, gh: torch.Tensor):
        src, scale, a, n = ctx.saved_tensors
        first_order_only()
        grad_a = grad_n = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # sign(a)·g·gh in one buffer; then ∂h/∂n = −Σ_c grad_a·a / n, since sign(a)·a = |a|
            grad_a = a.sign().mul_(rebuild(src, scale, pool=ctx.pool)).mul_(gh).div_(n)
            if ctx.needs_input_grad[2]:
                grad_n = _sum_prod_to(grad_a, a, n.shape).div_(n).neg_()
        grad_g = a.abs().div_(n).mul_(gh) if ctx.needs_input_grad[0] else None
        return grad_g, grad_a if ctx.needs_input_grad[1] else None, grad_n, None, None, None


class BNGrad(torch.autograd.Function):
    """``h = g · γ · r(x)`` (the closed-gate backward of an uncentered batch norm not preceded by a b = 2 scaling),
    differentiable in ``g``, ``x`` and ``γ``: ``∂r/∂x = −r³ (x − μ) / M`` per channel (M = N·H·W). ``r`` and ``μ``
    are passed as values."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, r: torch.Tensor,
                mean: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, x, weight, r, mean)
        return bn_scaled(g, r if weight is None else weight.detach() * r)

    @staticmethod
    def backward(ctx, gh: torch.Tensor):
        g, x, weight, r, mean = ctx.saved_tensors
        first_order_only()
        w = 1.0 if weight is None else weight
        t = _channel_dot(gh, g)
        grad_w = t * r if weight is not None and ctx.needs_input_grad[2] else None
        grad_x = var_grad(x, mean, rsqrt_grad_coef(t, w, r, x)) if ctx.needs_input_grad[1] else None
        grad_g = gh * per_channel(w * r) if ctx.needs_input_grad[0] else None
        return grad_g, grad_x, grad_w, None, None


def _channel_dot(u: torch.Tensor, v: torch.Tensor, s: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``Σ_{n,h,w} u · v`` (``· |a|/n`` with ``s = (a, n)``) per channel, one slice of the batch at a time."""
    if s is None:
        return sum((ui * vi).sum((0, 2, 3)) for ui, vi in _slices(u, v))
    return sum((ui * vi).mul_(ai.abs().div_(ni)).sum((0, 2, 3)) for ui, vi, ai, ni in _slices(u, v, *s))


class ScaleBNGrad(torch.autograd.Function):
    """``h = |a|/n · γ r(x) · g``: the closed-gate backward of a b = 2 scaling (``x = a|a|/n``) and the uncentered
    batch norm right after it, as one node, differentiable in ``g``, ``a``, ``n`` and ``γ``. With ``s = |a|/n`` and
    ``t = Σ_{n,h,w} gh · s · g`` per channel:

    - ``∂/∂g = gh · s · γr``;  ``∂/∂γ = t · r``;
    - through ``s``: ``gh · g · γr · sign(a)/n`` to ``a`` and ``−Σ_c gh · g · γr · |a|/n²`` to ``n``;
    - through ``r(x)``: ``x̄ = −γ t r³ (x − μ)/M`` (the batch variance), then ``∂x/∂a = 2|a|/n``, ``∂x/∂n = −x/n``.

    ``src``/``pool``: ``g`` is an average pool's input gradient of ``src`` (kept instead of ``g``, rebuilt here).
    ``h_bn``: the batch norm's own closed-gate output ``g · γr`` (its node is dropped): ``h`` is built in its buffer,
    which nothing else holds (:func:`gte.bcos_kernels._closed_scale` checks), so the pair allocates one tensor."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, a: torch.Tensor, n: torch.Tensor, weight: torch.Tensor | None,
                x: torch.Tensor, r: torch.Tensor, mean: torch.Tensor, src: torch.Tensor | None,
                pool: tuple | None, h_bn: torch.Tensor) -> torch.Tensor:
        ctx.pool = pool
        scale = r if weight is None else weight.detach() * r
        ctx.save_for_backward(g if src is None else src, a, n, weight, x, r, mean, scale)
        ctx.mark_dirty(h_bn)
        return _scale_(h_bn, a, n)

    @staticmethod
    def backward(ctx, gh: torch.Tensor):
        src, a, n, weight, x, r, mean, scale = ctx.saved_tensors
        first_order_only()
        g = rebuild(src, pool=ctx.pool)
        t = _channel_dot(gh, g, (a, n))
        grad_w = t * r if weight is not None and ctx.needs_input_grad[3] else None
        grad_a = grad_n = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_a = a.sign().mul_(g).mul_(per_channel(scale)).mul_(gh).div_(n)  # through s
            del g  # an activation-sized tensor less before the rest is built
            grad_n = _sum_prod_to(grad_a, a, n.shape)
            c = rsqrt_grad_coef(t, 1.0 if weight is None else weight, r, x)
            for gai, gni, xi, ai, ni in _slices(grad_a, grad_n, x, a, n):  # through r(x), x = a|a|/n
                gx = var_grad(xi, mean, c)
                gni.add_(sum_to(gx * xi, gni.shape))
                gai.addcmul_(gx, ai.abs().div_(ni), value=2.0)
            grad_n.div_(n).neg_()
        grad_g = a.abs().div_(n).mul_(gh).mul_(per_channel(scale)) if ctx.needs_input_grad[0] else None
        return grad_g, grad_a, grad_n, grad_w, None, None, None, None, None, None


class ConvInputGrad(torch.autograd.Function):
    """∂conv2d(x, w)/∂x applied to ``g`` (a transposed convolution), differentiable in ``g`` and ``w``. With a recipe
    for ``g`` (noted by the scaling above it) it keeps the recipe's tensors instead of ``g`` and rebuilds ``g`` for its
    weight gradient (elementwise passes instead of an activation-sized tensor held until the final backward)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conv: tuple, src: torch.Tensor | None,
                scale: torch.Tensor | None, a: torch.Tensor | None, n: torch.Tensor | None,
                pool: tuple | None) -> torch.Tensor:
        ctx.conv, ctx.pool = conv, pool
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
            g = rebuild(src, scale, *((None, None) if a is None else (a.detach(), n.detach())), ctx.pool)
            grad_w = torch.ops.aten.convolution_backward(g, gg, w, None, stride, padding, dilation, False, [0, 0],
                                                         groups, [False, True, False])[1]
            del g  # before grad_g is allocated
        grad_g = F.conv2d(gg, w, None, *ctx.conv) if ctx.needs_input_grad[0] else None
        return grad_g, None, grad_w, None, None, None, None, None, None
