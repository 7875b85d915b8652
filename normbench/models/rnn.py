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

All gates of a step come from one matmul per input; the input projection and its
norm run over every step at once before the loop. An LSTM with no norm in the cell is
a standard LSTM and runs through PyTorch's fused kernel instead of the Python loop.
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.errors import UserError
from normbench.models import MODELS
from normbench.norms import RECURRENT, NormFactory, StepNorm


class _NormCell(nn.Module):
    """The part LSTM and GRU share: fused gate projections of the input and the hidden state, each
    followed by its own norm, and the gate bias added after the norms."""

    gates: int

    def __init__(self, input_size: int, hidden_size: int, steps: int, norm: NormFactory):
        super().__init__()
        g = self.gates * hidden_size
        self.hidden_size = hidden_size
        self.w_x = nn.Linear(input_size, g, bias=False)
        self.w_h = nn.Linear(hidden_size, g, bias=False)
        self.bias = nn.Parameter(torch.zeros(g))
        self.norm_x = norm(g, RECURRENT, steps)
        self.norm_h = norm(g, RECURRENT, steps)


class NormLSTM(_NormCell):
    gates = 4
    use_loop = False  # force the per-step loop even without norms (tests compare the two paths)

    def __init__(self, input_size: int, hidden_size: int, steps: int, norm: NormFactory):
        super().__init__(input_size, hidden_size, steps, norm)
        self.norm_c = norm(hidden_size, RECURRENT, steps)

    def reset_cell_parameters(self) -> None:
        with torch.no_grad():
            self.bias.zero_()
            self.bias[self.hidden_size: 2 * self.hidden_size] = 1.0  # forget gate (i, f, o, g) starts open

    @property
    def plain(self) -> bool:
        """No norm inside the cell: it is a standard LSTM, and PyTorch's fused kernel can run it."""
        return all(isinstance(m, StepNorm) and isinstance(m.norm, nn.Identity)
                   for m in (self.norm_x, self.norm_h, self.norm_c))

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
        steps, n, _ = x.shape  # (T, N, input_size)
        xs = self.norm_x(self.w_x(x)) + self.bias  # (T, N, 4H), all steps at once
        h = c = x.new_zeros(n, self.hidden_size)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, n, _ = x.shape  # (T, N, input_size)
        xs = self.norm_x(self.w_x(x)) + self.bias  # (T, N, 3H): r, z, n
        h = x.new_zeros(n, self.hidden_size)
        hid = self.hidden_size
        for t, x_t in enumerate(xs.unbind(0)):  # unbind: see NormLSTM.forward
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
