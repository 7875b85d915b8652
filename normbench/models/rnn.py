"""Recurrent nets that read an image row by row (sequential MNIST / CIFAR), with norms inside the cell.

An image (C, H, W) becomes a sequence of H steps of C*W features. The norm sits
inside the cell, on each pre-activation separately, following the papers:

* LSTM: gates (i, f, o, g) = norm_x(W_x x_t) + norm_h(W_h h_{t-1}) + b;  c_t = f*c + i*g;
  h_t = o * tanh(norm_c(c_t)).  With ``ln`` this is the layer-normalized LSTM of
  Ba et al. 2016; with ``bn`` the recurrent batch norm LSTM of Cooijmans et al. 2016
  (statistics per time step, gamma starting at 0.1); with ``gn`` group norm on the
  gate pre-activations.
* GRU: r, z = sigma(norm_x(W_x x)_rz + norm_h(W_h h)_rz + b);
  n = tanh(norm_x(W_x x)_n + r * norm_h(W_h h)_n + b_n);  h = (1 - z) n + z h.

All gates of a step come from one matmul per input, and each norm normalizes the whole gate
vector (4H or 3H features) in one call; the input projection and its norm run over every step
at once before the loop. A cell with no norm in it is a standard LSTM/GRU and runs through
PyTorch's fused kernel. A cell with LN, GN or recurrent BN runs its recurrence as one autograd
node with a hand-written backward (`_LSTMRecurrence`, `_GRURecurrence`): per step one matmul
and about ten elementwise kernels each way, and the weight gradient as one matmul over all
steps, where autograd through the step loop makes some twenty nodes per step. That form writes
tanh(x) as 2 sigmoid(2x) - 1, so one sigmoid covers all gates (tanh costs three sigmoids on
CPU); the doubling is folded into the gate inputs and the norms' affine once per sequence.
The step loop (`_loop`) stays for whatever the fused form cannot stand in for: norms it does
not know, forward hooks or replaced forwards on the per-step layers (PreciseBN, the BN
evaluation modes), autocast and torch.compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from normbench.errors import UserError
from normbench.models import MODELS
from normbench.norms import RECURRENT, GroupNorm, NormFactory, RecurrentBatchNorm, StepNorm

_aten = torch.ops.aten


class _GroupStats:
    """LN (one group) or GN over consecutive features of each sample: the functional twin of a cell's
    StepNorm(LayerNorm / GroupNorm), for the fused recurrences."""

    def __init__(self, groups: int, eps: float):
        self.groups, self.eps = groups, eps

    def forward(self, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, t: int) -> tuple[torch.Tensor, tuple]:
        """(weight * normalized a + bias, what `backward` needs); a is (N, C)."""
        if self.groups == 1:
            y, mean, rstd = torch.native_layer_norm(a, a.shape[1:], weight, bias, self.eps)
            return y, (a, mean, rstd, bias)
        rows = a.view(-1, a.shape[1] // self.groups)  # (N * G, C / G): PyTorch's group-norm kernel is slow at H x W = 1
        ahat, mean, rstd = torch.native_layer_norm(rows, rows.shape[1:], None, None, self.eps)
        ahat = ahat.view_as(a)
        return torch.addcmul(bias, ahat, weight), (rows, mean, rstd, ahat)

    def backward(self, dy: torch.Tensor, weight: torch.Tensor, saved: tuple) -> tuple[torch.Tensor, tuple]:
        """The gradient wrt a, and this step's part of the affine's gradients (for `param_grads`).

        `dy` must not be overwritten later in the backward pass: GN keeps it for `param_grads`."""
        if self.groups == 1:
            a, mean, rstd, bias = saved
            da, dw, db = _aten.native_layer_norm_backward(dy, a, a.shape[1:], mean, rstd, weight, bias,
                                                          [True, True, True])
            return da, (dw, db)
        rows, mean, rstd, ahat = saved
        da = _aten.native_layer_norm_backward((dy * weight).view_as(rows), rows, rows.shape[1:], mean, rstd, None,
                                              None, [True, False, False])[0]
        return da.view_as(dy), (dy, ahat)  # the affine's gradients: over all steps at once, in param_grads

    def param_grads(self, parts: list[tuple]) -> list[torch.Tensor]:
        """(d weight, d bias) summed over the steps, from each step's part."""
        if self.groups == 1:
            return _summed(parts)
        dy, ahat = (torch.stack(p) for p in zip(*parts))  # (T, N, C): two reductions, not two per step
        return [(dy * ahat).sum((0, 1)), dy.sum((0, 1))]


class _BatchStats:
    """Recurrent BN as RecurrentBatchNorm computes it: step t normalizes with its batch statistics
    (training, or no running averages) or with row `bn.row(t)` of the running averages, and in
    training updates that row. Counts every step in num_batches_tracked at once."""

    def __init__(self, bn: RecurrentBatchNorm, steps: int):
        self.bn, self.eps = bn, bn.eps
        self.batch = bn.training or not bn.track_running_stats
        self.rows = [bn.row(t) for t in range(steps)]
        self.factors = [0.0] * steps
        if bn.training and bn.track_running_stats:
            self.factors = self._count()

    def _count(self) -> list[float]:
        """Add every step's batch to num_batches_tracked; return the momentum of each step's update
        (with momentum None, 1 / the row's count so far: a cumulative average)."""
        bn = self.bn
        tracked = bn.num_batches_tracked
        added = torch.tensor([self.rows.count(r) for r in range(len(tracked))], device=tracked.device)
        if bn.momentum is not None:
            tracked += added
            return [bn.momentum] * len(self.rows)
        counts, factors = tracked.tolist(), []
        for row in self.rows:
            counts[row] += 1
            factors.append(1.0 / counts[row])
        tracked += added
        return factors

    def forward(self, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, t: int) -> tuple[torch.Tensor, tuple]:
        bn, row = self.bn, self.rows[t]
        mean = bn.running_mean[row] if bn.track_running_stats else None  # a view: updated in place
        var = bn.running_var[row] if bn.track_running_stats else None
        y, save_mean, save_invstd = torch.native_batch_norm(a, weight, bias, mean, var, self.batch,
                                                            self.factors[t], self.eps)
        return y, (a, mean, var, save_mean, save_invstd)

    def backward(self, dy: torch.Tensor, weight: torch.Tensor, saved: tuple) -> tuple[torch.Tensor, tuple]:
        a, mean, var, save_mean, save_invstd = saved
        da, dw, db = _aten.native_batch_norm_backward(dy, a, weight, mean, var, save_mean, save_invstd, self.batch,
                                                      self.eps, [True, True, True])
        return da, (dw, db)

    def param_grads(self, parts: list[tuple]) -> list[torch.Tensor]:
        return _summed(parts)


def _twin(norm: nn.Module, steps: int) -> tuple[_GroupStats | _BatchStats, torch.Tensor, torch.Tensor]:
    """(functional twin, gamma, beta) of a cell norm that `_twin_known` accepts."""
    if isinstance(norm, RecurrentBatchNorm):
        return _BatchStats(norm, steps), norm.weight, norm.bias
    inner = norm.norm
    return _GroupStats(getattr(inner, "num_groups", 1), inner.eps), inner.weight, inner.bias


def _twin_known(norm: nn.Module, batch: int) -> bool:
    if isinstance(norm, RecurrentBatchNorm):  # ghost sub-batches take the step loop
        return not (norm.training and norm.norm_batch_size not in (None, batch))
    inner = norm.norm if isinstance(norm, StepNorm) else None
    if isinstance(inner, nn.LayerNorm):
        return len(inner.normalized_shape) == 1 and inner.weight is not None and inner.bias is not None
    return isinstance(inner, (GroupNorm, nn.GroupNorm)) and inner.weight is not None


def _weight_grad(das: list[torch.Tensor], saved: list[tuple]) -> torch.Tensor:
    """The gradient of W_h: sum over steps of da_t^T h_{t-1}, as one matmul over all steps (das in
    backward order; each step's saved values start with h_{t-1}). One large matmul instead of one
    per step: on a busy CPU every multithreaded kernel waits for its slowest thread."""
    da = torch.stack(das[::-1]).flatten(0, 1)  # (T * N, gates * H)
    return da.t() @ torch.stack([step[0] for step in saved]).flatten(0, 1)


def _summed(grads: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per-step (d weight, d bias) pairs summed over the steps."""
    return [torch.stack(g).sum(0) for g in zip(*grads)]


def _tanh_from_sigmoid(s: torch.Tensor) -> torch.Tensor:
    """tanh(x), given s = sigmoid(2 x)."""
    return s.mul(2).sub_(1)


class _LSTMRecurrence(torch.autograd.Function):
    """h_T of `NormLSTM._loop`, with a hand-written backward. xs (T, N, 4H): the normalized input
    projections; w_nh, b_nh: norm_h's affine, with the gate bias in b_nh; w_nc, b_nc: norm_c's."""

    @staticmethod
    def forward(ctx, xs, w_h, w_nh, b_nh, w_nc, b_nc, norm_h, norm_c):
        hid = w_h.shape[1]
        h = c = xs.new_zeros(xs.shape[1], hid)  # (N, H)
        # Each tanh is taken as 2 sigmoid(2x) - 1 (tanh costs several sigmoids on CPU): one sigmoid covers
        # all four gates. The doubled inputs come from the affines of the norms and the scale k on x_t.
        k = torch.ones_like(w_nh)
        k[3 * hid:] = 2
        w_nh2, b_nh2, w_nc2, b_nc2 = w_nh * k, b_nh * k, 2 * w_nc, 2 * b_nc
        saved = []
        for t, x_t in enumerate(xs.unbind(0)):
            y, stats_h = norm_h.forward(h @ w_h.t(), w_nh2, b_nh2, t)
            s = torch.sigmoid(torch.addcmul(y, x_t, k))  # (N, 4H): i, f, o, and (g + 1) / 2
            i, f, o, s_g = s.chunk(4, dim=1)
            g = _tanh_from_sigmoid(s_g)
            c_prev, h_prev = c, h
            c = torch.addcmul(f * c, i, g)
            y_c, stats_c = norm_c.forward(c, w_nc2, b_nc2, t)
            tanh_c = _tanh_from_sigmoid(torch.sigmoid(y_c))
            h = o * tanh_c
            saved.append((h_prev, c_prev, stats_h, s, g, stats_c, tanh_c))
        ctx.saved, ctx.norms = saved, (norm_h, norm_c)
        ctx.save_for_backward(w_h, w_nh, w_nc)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        w_h, w_nh, w_nc = ctx.saved_tensors
        norm_h, norm_c = ctx.norms
        steps, hid = len(ctx.saved), w_h.shape[1]
        dxs = dh.new_empty(steps, dh.shape[0], 4 * hid)  # gradient of the gates, per step
        ds = dh.new_empty(dh.shape[0], 3 * hid)  # gradient of sigmoid(i, f, o), per step
        dc = torch.zeros_like(dh)
        das, grads_h, grads_c = [], [], []
        for t in reversed(range(steps)):
            _, c_prev, stats_h, s, g, stats_c, tanh_c = ctx.saved[t]
            i, f, o, _ = s.chunk(4, dim=1)
            dc_t, grad_c = norm_c.backward(_aten.tanh_backward(dh * o, tanh_c), w_nc, stats_c)
            dc = dc + dc_t
            torch.mul(dc, g, out=ds[:, :hid])
            torch.mul(dc, c_prev, out=ds[:, hid:2 * hid])
            torch.mul(dh, tanh_c, out=ds[:, 2 * hid:])
            _aten.sigmoid_backward.grad_input(ds, s[:, :3 * hid], grad_input=dxs[t, :, :3 * hid])
            _aten.tanh_backward.grad_input(dc * i, g, grad_input=dxs[t, :, 3 * hid:])
            da, grad_h = norm_h.backward(dxs[t], w_nh, stats_h)
            dh = da @ w_h
            dc = dc * f
            das.append(da)
            grads_h.append(grad_h)
            grads_c.append(grad_c)
        return (dxs, _weight_grad(das, ctx.saved), *norm_h.param_grads(grads_h), *norm_c.param_grads(grads_c),
                None, None)


class _GRURecurrence(torch.autograd.Function):
    """h_T of `NormGRU._loop`, with a hand-written backward. xs (T, N, 3H): the normalized input
    projections with the gate bias; w_n, b_n: norm_h's affine, with b_hn in the n rows of b_n."""

    @staticmethod
    def forward(ctx, xs, w_h, w_n, b_n, norm_h):
        hid = w_h.shape[1]
        h = xs.new_zeros(xs.shape[1], hid)  # (N, H)
        saved = []
        for t, x_t in enumerate(xs.unbind(0)):
            y, stats = norm_h.forward(h @ w_h.t(), w_n, b_n, t)  # (N, 3H)
            rz = torch.sigmoid(x_t[:, :2 * hid] + y[:, :2 * hid])
            r, z = rz.chunk(2, dim=1)
            n = torch.tanh(torch.addcmul(x_t[:, 2 * hid:], r, y[:, 2 * hid:]))
            h_prev, h = h, torch.lerp(n, h, z)  # (1 - z) * n + z * h
            saved.append((h_prev, stats, y, rz, n))
        ctx.saved, ctx.norm_h = saved, norm_h
        ctx.save_for_backward(w_h, w_n)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        w_h, w_n = ctx.saved_tensors
        steps, hid = len(ctx.saved), w_h.shape[1]
        dxs = dh.new_empty(steps, dh.shape[0], 3 * hid)  # gradient of the gates' input part, per step
        drz = dh.new_empty(dh.shape[0], 2 * hid)  # gradient of r and z, per step
        dys = dh.new_empty(steps, dh.shape[0], 3 * hid)  # gradient of norm_h's output, per step (GN keeps them)
        das, grads = [], []
        for t in reversed(range(steps)):
            h_prev, stats, y, rz, n = ctx.saved[t]
            r, z = rz.chunk(2, dim=1)
            dy = dys[t]
            dh_z = dh * z
            dv = _aten.tanh_backward.grad_input(dh - dh_z, n, grad_input=dxs[t, :, 2 * hid:])
            torch.mul(dv, y[:, 2 * hid:], out=drz[:, :hid])
            torch.mul(dh, h_prev - n, out=drz[:, hid:])
            _aten.sigmoid_backward.grad_input(drz, rz, grad_input=dy[:, :2 * hid])
            torch.mul(dv, r, out=dy[:, 2 * hid:])
            dxs[t, :, :2 * hid] = dy[:, :2 * hid]
            da, grad = ctx.norm_h.backward(dy, w_n, stats)
            dh = torch.addmm(dh_z, da, w_h)
            das.append(da)
            grads.append(grad)
        return dxs, _weight_grad(das, ctx.saved), *ctx.norm_h.param_grads(grads), None


class _NormCell(nn.Module):
    """The part LSTM and GRU share: fused gate projections of the input and the hidden state, each
    followed by its own norm, and the gate bias added after the norms."""

    gates: int
    use_loop = False  # force the step loop (tests compare the paths; forward_work counts its calls)

    def __init__(self, input_size: int, hidden_size: int, steps: int, norm: NormFactory):
        super().__init__()
        g = self.gates * hidden_size
        self.hidden_size = hidden_size
        self.w_x = nn.Linear(input_size, g, bias=False)
        self.w_h = nn.Linear(hidden_size, g, bias=False)
        self.bias = nn.Parameter(torch.zeros(g))
        self.norm_x = norm(g, RECURRENT, steps)
        self.norm_h = norm(g, RECURRENT, steps)

    def step_norms(self) -> tuple[nn.Module, ...]:
        return (self.norm_h,)

    @property
    def plain(self) -> bool:
        """No norm inside the cell: a standard LSTM/GRU, which PyTorch's fused kernel can run."""
        return all(isinstance(m, StepNorm) and isinstance(m.norm, nn.Identity)
                   for m in (self.norm_x, *self.step_norms()))

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether the hand-written recurrence can stand in for the step loop: norms it knows, and
        nothing that watches or replaces the per-step calls (PreciseBN's hooks, batch_statistics)."""
        if self.use_loop or torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
            return False
        watched = (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
                   or any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m)
                          for layer in (self.w_h, self.norm_x, *self.step_norms()) for m in layer.modules()))
        return not watched and all(_twin_known(m, x.shape[1]) for m in self.step_norms())

    def input_norm(self, p: torch.Tensor) -> torch.Tensor:
        """norm_x on every step's projection (T, N, C) at once; GN as layer norm over (T * N * G, C / G),
        since PyTorch's group-norm kernel is slow at H x W = 1."""
        gn = getattr(self.norm_x, "norm", None)
        if not isinstance(gn, (GroupNorm, nn.GroupNorm)):
            return self.norm_x(p)
        size = p.shape[-1] // gn.num_groups
        v = F.layer_norm(p.reshape(-1, size), (size,), eps=gn.eps)
        return torch.addcmul(gn.bias, v.view_as(p), gn.weight)



class NormLSTM(_NormCell):
    gates = 4

    def __init__(self, input_size: int, hidden_size: int, steps: int, norm: NormFactory):
        super().__init__(input_size, hidden_size, steps, norm)
        self.norm_c = norm(hidden_size, RECURRENT, steps)

    def reset_cell_parameters(self) -> None:
        with torch.no_grad():
            self.bias.zero_()
            self.bias[self.hidden_size: 2 * self.hidden_size] = 1.0  # forget gate (i, f, o, g) starts open

    def step_norms(self) -> tuple[nn.Module, ...]:
        return self.norm_h, self.norm_c

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same LSTM through torch.lstm (oneDNN on CPU, cuDNN on GPU): gates reordered to (i, f, g, o)."""
        hid = self.hidden_size
        order = torch.cat([torch.arange(0, 2 * hid), torch.arange(3 * hid, 4 * hid),
                           torch.arange(2 * hid, 3 * hid)]).to(x.device)
        w_ih, w_hh, b = self.w_x.weight[order], self.w_h.weight[order], self.bias[order]
        h0 = x.new_zeros(1, x.shape[1], hid)
        out, _, _ = torch.lstm(x, (h0, h0), [w_ih, w_hh, b, torch.zeros_like(b)], True, 1, 0.0,
                               self.training, False, False)
        return out[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain and not self.use_loop:
            return self.fused(x)
        if self.fusable(x):
            return self._recurrence(self.input_norm(self.w_x(x)))
        return self._loop(self.norm_x(self.w_x(x)) + self.bias)  # (T, N, 4H), all steps at once

    def _recurrence(self, xs: torch.Tensor) -> torch.Tensor:
        """h_T through `_LSTMRecurrence`; the gate bias joins norm_h's shift (no pass over the sequence)."""
        (norm_h, w_nh, b_nh), (norm_c, w_nc, b_nc) = (_twin(m, xs.shape[0]) for m in self.step_norms())
        return _LSTMRecurrence.apply(xs, self.w_h.weight, w_nh, b_nh + self.bias, w_nc, b_nc, norm_h, norm_c)

    def _loop(self, xs: torch.Tensor) -> torch.Tensor:
        """The step loop through the norm modules; the reference the fused paths are tested against."""
        h = c = xs.new_zeros(xs.shape[1], self.hidden_size)
        hid = self.hidden_size
        # unbind, not xs[t]: indexing would make every step's backward zero a gradient of the whole sequence
        for t, x_t in enumerate(xs.unbind(0)):
            gates = x_t + self.norm_h(self.w_h(h), t)  # (N, 4H): i, f, o, g
            i, f, o = torch.sigmoid(gates[:, : 3 * hid]).chunk(3, dim=1)  # one kernel for three gates
            c = torch.addcmul(f * c, i, torch.tanh(gates[:, 3 * hid:]))
            h = o * torch.tanh(self.norm_c(c, t))
        return h


class NormGRU(_NormCell):
    gates = 3

    def __init__(self, input_size: int, hidden_size: int, steps: int, norm: NormFactory):
        super().__init__(input_size, hidden_size, steps, norm)
        self.bias_hn = nn.Parameter(torch.zeros(hidden_size))

    def reset_cell_parameters(self) -> None:
        with torch.no_grad():
            self.bias.zero_()
            self.bias_hn.zero_()

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same GRU through torch.gru: PyTorch's gate order (r, z, n), b_hn its n part of b_hh."""
        h0 = x.new_zeros(1, x.shape[1], self.hidden_size)
        b_hh = torch.cat([self.bias_hn.new_zeros(2 * self.hidden_size), self.bias_hn])
        out, _ = torch.gru(x, h0, [self.w_x.weight, self.w_h.weight, self.bias, b_hh], True, 1, 0.0,
                           self.training, False, False)
        return out[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain and not self.use_loop:
            return self.fused(x)
        if self.fusable(x):
            return self._recurrence(self.input_norm(self.w_x(x)) + self.bias)
        return self._loop(self.norm_x(self.w_x(x)) + self.bias)  # (T, N, 3H): r, z, n

    def _recurrence(self, xs: torch.Tensor) -> torch.Tensor:
        """h_T through `_GRURecurrence`; b_hn joins the n rows of norm_h's shift."""
        norm_h, w_n, b_n = _twin(self.norm_h, xs.shape[0])
        b_n = torch.cat([b_n[: 2 * self.hidden_size], b_n[2 * self.hidden_size:] + self.bias_hn])
        return _GRURecurrence.apply(xs, self.w_h.weight, w_n, b_n, norm_h)

    def _loop(self, xs: torch.Tensor) -> torch.Tensor:
        """The step loop through the norm modules; the reference the fused paths are tested against."""
        h = xs.new_zeros(xs.shape[1], self.hidden_size)
        hid = self.hidden_size
        for t, x_t in enumerate(xs.unbind(0)):  # unbind: see NormLSTM._loop
            h_t = self.norm_h(self.w_h(h), t)
            r, z = torch.sigmoid(x_t[:, : 2 * hid] + h_t[:, : 2 * hid]).chunk(2, dim=1)
            cand = torch.tanh(x_t[:, 2 * hid:] + r * (h_t[:, 2 * hid:] + self.bias_hn))
            h = torch.lerp(cand, h, z)  # (1 - z) * cand + z * h
        return h


CELLS = {"lstm": NormLSTM, "gru": NormGRU}


class RowRNN(nn.Module):
    def __init__(self, cell: nn.Module, hidden_size: int, num_classes: int):
        super().__init__()
        self.cell = cell
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(2, 0, 1, 3).flatten(2)  # (N, C, H, W) -> (H, N, C*W): one row per step
        return self.head(self.cell(seq))


@MODELS.register("rnn")
def rnn(cfg, input_shape: tuple[int, int, int], num_classes: int, norm: NormFactory) -> nn.Module:
    """LSTM or GRU reading the image row by row, with the norm inside the cell."""
    if cfg.cell not in CELLS:
        raise UserError(f"unknown model.cell {cfg.cell!r}; valid: {', '.join(CELLS)}")
    c, h, w = input_shape
    cell = CELLS[cfg.cell](c * w, cfg.hidden_size, h, norm)
    return RowRNN(cell, cfg.hidden_size, num_classes)
