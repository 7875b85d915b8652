"""The LSTM recurrence with norms inside, and the input projections' group norm, through the C
kernels of `normbench/kernels/lstm_step.c` (built and loaded by `normbench.kernels.build`).

PyTorch runs each elementwise operation of a step as its own kernel, and at batch 64 a kernel's
fixed cost and its trip through memory outweigh its arithmetic: the hand-written recurrence in
`recurrences` still makes about a dozen kernel calls per step each way. Here a step is W_h's matmul
(PyTorch) and one C call that normalizes the gates, applies their nonlinearities, updates the cell,
normalizes it and makes h, a row of the batch at a time; the backward step is the same. The cells
take this path on CPU in float32 and float64 when `build.library()` is there, and `recurrences`
otherwise.
"""

from __future__ import annotations

import ctypes

import torch
from torch.autograd.function import once_differentiable

from normbench.kernels import build
from normbench.models.rnn.step_norms import BatchStats, GroupStats, LayerStats


def _spec(norm) -> tuple[int, int, float] | None:
    """(groups, over columns, eps) of a twin the kernels implement, else None."""
    if isinstance(norm, LayerStats):
        return 1, 0, norm.eps
    if isinstance(norm, GroupStats):
        return (norm.groups, 0, norm.eps) if norm.groups > 0 else None
    if isinstance(norm, BatchStats) and norm.batch:
        return 1, 1, norm.eps
    return None


def takes(x: torch.Tensor, *params: torch.Tensor, groups: int = 1) -> bool:
    """Whether the kernels can run on this tensor (C features last) with these parameters (`build.takes`)
    and `groups` dividing C."""
    return groups > 0 and x.shape[-1] % groups == 0 and build.takes(x, *params)


def usable(xs: torch.Tensor, norm_h, norm_c, *params: torch.Tensor) -> bool:
    """Whether the C recurrence can run these norms (`step_norms` twins) on this input (T, N, 4H) with
    these parameters: LN, GN with groups that divide the features, or BN with the batch's statistics
    over more than one sample and running averages of the input's dtype."""
    spec_h, spec_c = _spec(norm_h), _spec(norm_c)
    gates = xs.shape[-1]
    if spec_h is None or spec_c is None or gates % spec_h[0] or (gates // 4) % spec_c[0]:
        return False
    for m in (norm_h, norm_c):
        if isinstance(m, BatchStats) and (xs.shape[1] < 2 or m.bn.track_running_stats and not all(
                b.dtype == xs.dtype and b.is_contiguous() for b in (m.bn.running_mean, m.bn.running_var))):
            return False
    return takes(xs, *params)


def _stat_buffers(norm, like: torch.Tensor, steps: int, n: int, c: int) -> tuple[torch.Tensor, ...]:
    groups, cols, _ = _spec(norm)
    size = c if cols else n * groups
    mean, rstd = like.new_empty(steps, size), like.new_empty(steps, size)
    var = like.new_empty(steps, c) if cols else None
    return mean, rstd, var


def _steps(t: torch.Tensor | None, count: int) -> list[int | None]:
    """The address of each of the first `count` steps (dim 0) of a contiguous buffer; Nones for None.
    Addresses as plain ints: a view per step and call would cost more than the C call."""
    if t is None:
        return [None] * count
    size = t.stride(0) * t.element_size()
    return [t.data_ptr() + k * size for k in range(count)]


class NativeLSTMRecurrence(torch.autograd.Function):
    """h_T of `NormLSTM._loop`, as `recurrences.LSTMRecurrence` computes it, through the C kernels.
    xs (T, N, 4H): the normalized input projections, gates (i, f, o, g); w_nh, b_nh: norm_h's affine,
    with the gate bias in b_nh; w_nc, b_nc: norm_c's."""

    @staticmethod
    def forward(ctx, xs, w_h, w_nh, b_nh, w_nc, b_nc, norm_h, norm_c):
        steps, n, hid = xs.shape[0], xs.shape[1], w_h.shape[1]
        kernel = build.kernel("lstm_forward", xs.dtype)
        xs = xs.contiguous()
        w_nh, b_nh, w_nc, b_nc = (p.detach().contiguous() for p in (w_nh, b_nh, w_nc, b_nc))
        a = xs.new_empty(steps, n, 4 * hid)  # W_h h_{t-1}
        s = xs.new_empty(steps, n, 4 * hid)  # the gates after their nonlinearities
        c = xs.new_zeros(steps + 1, n, hid)  # c_0 = 0
        hs = xs.new_zeros(steps + 1, n, hid)  # h_0 = 0
        tc = xs.new_empty(steps, n, hid)  # tanh(norm_c(c))
        (gh, colsh, eps_h), (gc, colsc, eps_c) = _spec(norm_h), _spec(norm_c)
        mean_h, rstd_h, var_h = _stat_buffers(norm_h, xs, steps, n, 4 * hid)
        mean_c, rstd_c, var_c = _stat_buffers(norm_c, xs, steps, n, hid)
        w_ht, buf = w_h.detach().t(), xs.new_empty(8 * hid)
        h_all, a_all = hs.unbind(0), a.unbind(0)
        a[0].zero_()  # W_h h_0, with h_0 = 0
        step_args = zip(*(_steps(b, steps) for b in (a, xs, c, s, c[1:], tc, hs[1:], mean_h, rstd_h, var_h, mean_c,
                                                      rstd_c, var_c)))
        for t, (a_t, x_t, c_prev, s_t, c_t, tc_t, h_t, mh, rh, vh, mc, rc, vc) in enumerate(step_args):
            if t:
                torch.mm(h_all[t], w_ht, out=a_all[t])
            kernel(n, hid, a_t, x_t, c_prev, s_t, c_t, tc_t, h_t, w_nh.data_ptr(), b_nh.data_ptr(), gh, colsh, eps_h,
                   mh, rh, vh, w_nc.data_ptr(), b_nc.data_ptr(), gc, colsc, eps_c, mc, rc, vc, buf.data_ptr())
        for norm, mean, var in ((norm_h, mean_h, var_h), (norm_c, mean_c, var_c)):
            if var is not None:
                _update_running(norm, mean, var, n)
        ctx.specs = _spec(norm_h), _spec(norm_c)
        ctx.save_for_backward(w_h, w_nh, w_nc, a, s, c, hs, tc, mean_h, rstd_h, mean_c, rstd_c)
        return hs[steps].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        w_h, w_nh, w_nc, a, s, c, hs, tc, mean_h, rstd_h, mean_c, rstd_c = ctx.saved_tensors
        (gh, colsh, _), (gc, colsc, _) = ctx.specs
        steps, n, hid = tc.shape
        kernel = build.kernel("lstm_backward", a.dtype)
        dy = torch.empty_like(s)  # the gates' pre-activations: xs's gradient
        da = torch.empty_like(a)  # norm_h's input's
        dc, scratch = dh.new_empty(n, hid), dh.new_empty(n, hid)
        sums, buf = dh.new_empty(8 * hid), dh.new_empty(8 * hid)  # 2 x 4H: the C code's scratch
        dwh, dbh, dwc, dbc = dh.new_zeros(4 * hid), dh.new_zeros(4 * hid), dh.new_zeros(hid), dh.new_zeros(hid)
        dh, w_h, da_all = dh.contiguous(), w_h.detach(), da.unbind(0)
        step_args = list(zip(*(_steps(b, steps) for b in (a, s, c, c[1:], tc, dy, da, mean_h, rstd_h, mean_c, rstd_c)),
                             _steps(s[1:], steps - 1) + [None]))  # the next step's forget gate: none at the last
        fixed = (scratch.data_ptr(), sums.data_ptr(), w_nh.data_ptr(), gh, colsh)
        for t in reversed(range(steps)):
            a_t, s_t, c_prev, c_t, tc_t, dy_t, da_t, mh, rh, mc, rc, s_next = step_args[t]
            kernel(n, hid, a_t, s_t, c_prev, c_t, tc_t, dh.data_ptr(), dc.data_ptr(), s_next, dy_t, da_t, *fixed, mh,
                   rh, dwh.data_ptr(), dbh.data_ptr(), w_nc.data_ptr(), gc, colsc, mc, rc, dwc.data_ptr(),
                   dbc.data_ptr(), buf.data_ptr())
            if t:  # h_0 is no parameter's function
                dh = torch.mm(da_all[t], w_h)
        dw_h = da.view(-1, 4 * hid).t() @ hs[:-1].view(-1, hid)
        return dy, dw_h, dwh, dbh, dwc, dbc, None, None


def _update_running(norm: BatchStats, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """Recurrent BN's running averages from every step's batch statistics, in step order."""
    bn = norm.bn
    if not bn.track_running_stats:
        return
    rows = (ctypes.c_long * len(norm.rows))(*norm.rows)
    factors = (ctypes.c_double * len(norm.factors))(*norm.factors)
    with torch.no_grad():
        rm, rv = bn.running_mean, bn.running_var  # usable() checked their dtype and layout
        build.kernel("running_update", mean.dtype)(
            mean.shape[0], mean.shape[1], n, rows, factors, mean.data_ptr(), var.data_ptr(), rm.data_ptr(),
            rv.data_ptr())


class NativeGroupNorm(torch.autograd.Function):
    """Group norm with a per-feature affine over the last dimension of x (..., C), every leading index a
    sample: the input projections of all steps at once."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        kernel = build.kernel("group_norm_forward", x.dtype)
        c = x.shape[-1]
        x = x.contiguous()
        rows = x.numel() // c
        y, mean, rstd = torch.empty_like(x), x.new_empty(rows * groups), x.new_empty(rows * groups)
        weight, bias, buf = weight.detach().contiguous(), bias.detach().contiguous(), x.new_empty(2 * c)
        kernel(rows, c, groups, eps, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), mean.data_ptr(),
               rstd.data_ptr(), buf.data_ptr())
        ctx.groups = groups
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        kernel = build.kernel("group_norm_backward", x.dtype)
        c = x.shape[-1]
        dy = dy.contiguous()
        dx, dw, db, buf = torch.empty_like(x), x.new_zeros(c), x.new_zeros(c), x.new_empty(2 * c)
        kernel(x.numel() // c, c, ctx.groups, x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), weight.data_ptr(),
               dy.data_ptr(), dx.data_ptr(), dw.data_ptr(), db.data_ptr(), buf.data_ptr())
        return dx, dw, db, None, None
