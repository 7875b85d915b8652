"""Ghost batch norm's arithmetic: each run of NBS consecutive samples normalized with its own
statistics, and the running averages' K updates (see `batch` for the semantics).

Flat (N, C) and spatial (N, C, ...) features go through normbench's C kernel
(`normbench/kernels/ghost_bn.c`: one pass each way) where it is built, on CPU in float32 and
float64. Without it, flat features take a hand-written autograd function of a few PyTorch kernels,
and spatial ones stack the sub-batches as channels for PyTorch's batch-norm kernel.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from normbench.kernels import build


@lru_cache(maxsize=64)
def _momentum_weights(momentum: float, k: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """(weight of the old value, weights of the K new values) after K updates at one momentum."""
    factors = [momentum] * k
    return _weights(factors, device, dtype)


def _weights(factors: Sequence[float], device: torch.device, dtype: torch.dtype) -> tuple:
    keep, new = 1.0, []
    for f in reversed(factors):  # a value's weight: its factor times what every later update keeps
        new.append(f * keep)
        keep *= 1.0 - f
    return keep, torch.tensor(new[::-1], device=device, dtype=dtype)


def sequential_update(buffer: torch.Tensor, values: torch.Tensor, factors: Sequence[float] | float) -> None:
    """`buffer` (C,) after ``buffer = (1 - f) buffer + f value`` for each row of `values` (K, C) in order."""
    k = values.shape[0]
    if isinstance(factors, float):
        keep, new = _momentum_weights(factors, k, values.device, values.dtype)
    else:
        keep, new = _weights(factors, values.device, values.dtype)
    buffer.addmv_(values.t().to(buffer.dtype), new.to(buffer.dtype), beta=keep)  # one kernel


class _FlatGhostNorm(torch.autograd.Function):
    """Ghost batch norm of flat features (N, C) with a hand-written backward.

    On small flat layers the cost of ghost BN is kernel launches, not arithmetic: the channel-
    stacking route below takes two layout copies each way plus the affine repeats. Here the sub-
    batches are a view, ``(K, NBS, C)``, the forward is eight small kernels and the backward the textbook
    batch-norm gradient, ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * gamma``,
    each mean over the sub-batch.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group: int, eps: float):
        n, c = x.shape
        xv = x.view(n // group, group, c)
        mean = xv.mean(1, keepdim=True)  # (var_mean over a middle dim is a slow kernel on CPU)
        xhat = xv - mean
        var = (xhat * xhat).mean(1, keepdim=True)
        rstd = (var + eps).rsqrt_()
        xhat.mul_(rstd)
        if weight is None:
            out = xhat if bias is None else xhat + bias
        else:
            out = xhat * weight if bias is None else torch.addcmul(bias, xhat, weight)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        unbiased = var.mul_(group / (group - 1)) if group > 1 else var
        return out.view(n, c), mean.view(-1, c), unbiased.view(-1, c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dmean, _dvar):
        xhat, rstd, weight = ctx.saved_tensors
        dy = dout.view(xhat.shape)
        dweight = (dy * xhat).sum((0, 1)) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dy.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            g = dy * weight if weight is not None else dy
            dx = g - g.mean(1, keepdim=True)
            dx.addcmul_(xhat, (g * xhat).mean(1, keepdim=True), value=-1.0).mul_(rstd)
            dx = dx.view(dout.shape)
        return dx, dweight, dbias, None, None


@lru_cache(maxsize=64)
def _factor_array(factors: tuple[float, ...]) -> ctypes.Array:
    """The running averages' K update factors as the C kernel reads them (cached: at a fixed momentum
    every step passes the same K factors)."""
    return (ctypes.c_double * len(factors))(*factors)


class _NativeGhostNorm(torch.autograd.Function):
    """Ghost batch norm of flat or spatial features (x contiguous) through the C kernels: statistics,
    normalization, affine and the running averages' updates in one pass over the sub-batches, the
    backward in another. The statistics go into `stats` (3, K, C: mean, unbiased variance, 1/std),
    which the caller made; `running` is the kernel's last three arguments (running mean and variance
    addresses, factors; or three None). The only output is the normalized x.

    At the MLP's sizes the Python around the two calls costs more than they do, and more inside a
    training step than alone (the matrix products between them evict what it touches), so it is kept
    to a few calls: addresses instead of views, one allocation for the affine's gradients, and
    `once_differentiable`'s guard only where a second derivative could be asked for."""

    @staticmethod
    def forward(ctx, x, weight, bias, group: int, eps: float, stats: torch.Tensor, running: tuple):
        n, c = x.shape[:2]
        ctx.sp = math.prod(x.shape[2:])  # positions per channel: 1 for flat features
        weight = x.new_ones(c) if weight is None else weight.contiguous()  # (a no-op on parameters)
        bias = x.new_zeros(c) if bias is None else bias.contiguous()
        out = torch.empty_like(x)
        row = stats.stride(0) * stats.element_size()
        ctx.mean = stats.data_ptr()
        ctx.rstd = ctx.mean + 2 * row
        build.kernel("ghost_bn_forward", x.dtype)(
            n // group, group, c, ctx.sp, eps, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
            ctx.mean, ctx.mean + row, ctx.rstd, *running)
        ctx.save_for_backward(x, weight, stats)  # stats: keeps the two addresses valid
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():  # create_graph=True: refuse a second derivative, not this one
            return _once_backward(ctx, dout)
        x, weight, _ = ctx.saved_tensors
        n, c = x.shape[:2]
        dout = dout.contiguous()
        dx, grads = torch.empty_like(x), x.new_empty(4, c)  # dw, db, and 2 x c of scratch
        dw = grads.data_ptr()
        row = c * grads.element_size()
        build.kernel("ghost_bn_backward", x.dtype)(
            n // ctx.group, ctx.group, c, ctx.sp, x.data_ptr(), ctx.mean, ctx.rstd, weight.data_ptr(), dout.data_ptr(),
            dx.data_ptr(), dw, dw + row, dw + 2 * row)
        _, wants_dw, wants_db, *_ = ctx.needs_input_grad
        if wants_dw or wants_db:
            dw, db, _, _ = grads.unbind()
            return dx, dw if wants_dw else None, db if wants_db else None, None, None, None, None
        return dx, None, None, None, None, None, None


_once_backward = torch.autograd.function.once_differentiable(_NativeGhostNorm.backward)


def _native(x: torch.Tensor, group: int, weight, bias, running: tuple | None) -> bool:
    """Whether the C kernel takes this ghost batch norm: CPU, float32/64, non-empty, whole sub-batches
    (else the PyTorch path raises), the affine and running averages (if any) of x's dtype and the
    latter contiguous, the kernels built, and no torch.compile tracing."""
    if x.dim() < 2 or group < 1 or x.shape[0] % group or not x.numel() or torch.compiler.is_compiling():
        return False
    if running is None:
        return build.takes(x, weight, bias)
    return running[0].is_contiguous() and running[1].is_contiguous() and build.takes(x, weight, bias, *running[:2])


def _native_norm(x: torch.Tensor, group: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 eps: float, running: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ghost batch norm through the C kernels: the output and the statistics (3, K, C)."""
    x = x.contiguous()
    k = x.shape[0] // group
    stats = x.new_empty(3, k, x.shape[1])
    if running is None:
        args = (None, None, None)
    else:
        factors = running[2]
        args = (running[0].data_ptr(), running[1].data_ptr(),
                _factor_array((factors,) * k if isinstance(factors, float) else tuple(factors)))
    return _NativeGhostNorm.apply(x, weight, bias, group, eps, stats, args), stats


def _torch_ghost(x: torch.Tensor, group: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 eps: float, running: tuple | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ghost batch norm in PyTorch kernels: output, each sub-batch's mean and unbiased variance."""
    n, c = x.shape[:2]
    k = n // group
    if x.dim() == 2:
        out, mean, var = _FlatGhostNorm.apply(x, weight, bias, group, eps)
    else:
        # (K, NBS, C, S) -> (NBS, K*C, S): each sub-batch's channels are channels of their own.
        xs = x.reshape(k, group, c, -1).transpose(0, 1).reshape(group, k * c, -1)
        mean, var = x.new_zeros(k * c), x.new_ones(k * c)  # momentum 1 leaves the batch statistics in them
        out = F.batch_norm(xs, mean, var, None if weight is None else weight.repeat(k),
                           None if bias is None else bias.repeat(k), True, 1.0, eps)
        out = out.reshape(group, k, c, -1).transpose(0, 1).reshape(x.shape)
        mean, var = mean.view(k, c), var.view(k, c)
    if running is not None:
        with torch.no_grad():
            sequential_update(running[0], mean, running[2])
            sequential_update(running[1], var, running[2])
    return out, mean, var


def ghost_batch_norm(x: torch.Tensor, group: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float, running: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm of each run of `group` consecutive samples of `x` (N, C, ...) with its own statistics.

    Returns the output and each sub-batch's mean and unbiased variance, both (N/group, C). With
    `running` = (running_mean, running_var, factors), each (C,) buffer is then updated once per
    sub-batch in order, r = (1 - f) r + f stat, with `factors` from `update_factors`.
    """
    out, stats = _ghost(x, group, weight, bias, eps, running)
    return out, stats[0], stats[1]


def ghost_norm(x: torch.Tensor, group: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, running: tuple | None = None) -> torch.Tensor:
    """`ghost_batch_norm`'s output alone, what the layers use: on the C path it skips the statistics' views."""
    return _ghost(x, group, weight, bias, eps, running)[0]


def _ghost(x: torch.Tensor, group: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
           running: tuple | None) -> tuple[torch.Tensor, torch.Tensor | tuple]:
    """The output and the statistics, mean and variance first: C's (3, K, C) tensor, or PyTorch's pair."""
    if _native(x, group, weight, bias, running):
        return _native_norm(x, group, weight, bias, eps, running)
    out, mean, var = _torch_ghost(x, group, weight, bias, eps, running)
    return out, (mean, var)


def update_factors(momentum: float | None, tracked: torch.Tensor, k: int) -> list[float] | float:
    """The update factors of K consecutive updates; `tracked` already counts them."""
    if momentum is not None:
        return float(momentum)
    done = int(tracked) - k
    return [1.0 / (done + j) for j in range(1, k + 1)]  # cumulative average, as in BatchNorm
