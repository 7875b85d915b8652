"""The LSTM and GRU cells with a norm inside, as modules: parameters, the path each forward takes,
and the step loop through the norm modules (see the package's docstring for the formulas)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normbench.models.rnn import native
from normbench.models.rnn.recurrences import GRURecurrence, LSTMRecurrence
from normbench.models.rnn.step_norms import twin, twin_known
from normbench.norms import RECURRENT, GroupNorm, NormFactory, StepNorm


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
                          for layer in (self.w_x, self.w_h, self.norm_x, *self.step_norms()) for m in layer.modules()))
        return not watched and all(twin_known(m, x.shape[1]) for m in self.step_norms())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h_T: PyTorch's fused kernel when no norm is in the cell, else the hand-written recurrence where it can
        stand in, else the step loop. Both get every step's normalized input projection (T, N, gates x H) at
        once; the loop gets it with the gate bias added (the recurrence places the bias itself)."""
        if self.plain and not self.use_loop:
            return self.fused(x)
        if self.fusable(x):
            return self._recurrence(self.input_norm(x))
        return self._loop(self.norm_x(self.w_x(x)) + self.bias)

    def input_norm(self, x: torch.Tensor) -> torch.Tensor:
        """norm_x on every step's input projection (T, N, C) at once. A step-independent norm (LN, GN, RMS)
        normalizes each of the T * N rows alike; GN as layer norm over (T * N * G, C / G), since PyTorch's
        group-norm kernel is slow at H x W = 1. Any other norm (recurrent BN) gets a (T, N, C) view of a
        batch-major (N, T, C) projection: BN's per-step statistics over (N, T * C) are then taken on a
        view, not on a transposing copy. fusable() saw no hooks on w_x."""
        if not isinstance(self.norm_x, StepNorm):
            return self.norm_x(F.linear(x.transpose(0, 1), self.w_x.weight).transpose(0, 1))
        p = F.linear(x, self.w_x.weight)
        gn = self.norm_x.norm
        if isinstance(gn, (GroupNorm, nn.GroupNorm)) and gn.weight is not None and gn.bias is not None:
            if native.takes(p, gn.weight, gn.bias, groups=gn.num_groups):
                return native.NativeGroupNorm.apply(p, gn.weight, gn.bias, gn.num_groups, gn.eps)
            size = p.shape[-1] // gn.num_groups
            v = F.layer_norm(p.view(-1, size), (size,), eps=gn.eps)
            return torch.addcmul(gn.bias, v.view_as(p), gn.weight)
        return self.norm_x.norm(p.view(-1, p.shape[-1])).view_as(p)


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

    def _recurrence(self, xs: torch.Tensor) -> torch.Tensor:
        """h_T through the C kernels where they can run (`native`), else `LSTMRecurrence`; the gate bias
        joins norm_h's shift (no pass over the sequence)."""
        norm_h, w_nh, b_nh = twin(self.norm_h, xs)
        norm_c, w_nc, b_nc = twin(self.norm_c, xs[..., :self.hidden_size])
        if native.usable(xs, norm_h, norm_c, self.w_h.weight, w_nh, b_nh, w_nc, b_nc, self.bias):
            return native.NativeLSTMRecurrence.apply(xs, self.w_h.weight, w_nh, b_nh + self.bias, w_nc, b_nc, norm_h,
                                                     norm_c)
        return LSTMRecurrence.apply(xs, self.w_h.weight, w_nh, b_nh + self.bias, w_nc, b_nc, norm_h, norm_c)

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

    def _recurrence(self, xs: torch.Tensor) -> torch.Tensor:
        """h_T through `GRURecurrence`; the gate bias joins the input projections, b_hn the n rows of norm_h's
        shift."""
        xs = xs + self.bias
        norm_h, w_n, b_n = twin(self.norm_h, xs)
        b_n = torch.cat([b_n[: 2 * self.hidden_size], b_n[2 * self.hidden_size:] + self.bias_hn])
        return GRURecurrence.apply(xs, self.w_h.weight, w_n, b_n, norm_h)

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
