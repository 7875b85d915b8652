"""Recurrent nets that read an image row by row (sequential MNIST / CIFAR), with norms inside the cell.

An image (C, H, W) becomes a sequence of H steps of C*W features. The norm sits
inside the cell, on each pre-activation separately, following the papers:

* LSTM: gates = norm_x(W_x x_t) + norm_h(W_h h_{t-1}) + b;  c_t = f*c + i*g;
  h_t = o * tanh(norm_c(c_t)).  With ``ln`` this is the layer-normalized LSTM of
  Ba et al. 2016; with ``bn`` the recurrent batch norm LSTM of Cooijmans et al. 2016
  (statistics per time step, gamma starting at 0.1); with ``gn`` group norm on the
  gate pre-activations.
* GRU: r, z = sigma(norm_x(W_x x)_rz + norm_h(W_h h)_rz + b);
  n = tanh(norm_x(W_x x)_n + r * norm_h(W_h h)_n + b_n);  h = (1 - z) n + z h.

All gates of a step come from one matmul per input; the input projection and its
norm run over every step at once before the loop.
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.errors import UserError
from normbench.models import MODELS
from normbench.norms import RECURRENT, NormFactory


class NormLSTM(nn.Module):
    gates = 4

    def __init__(self, input_size: int, hidden_size: int, steps: int, norm: NormFactory):
        super().__init__()
        g = self.gates * hidden_size
        self.hidden_size = hidden_size
        self.w_x = nn.Linear(input_size, g, bias=False)
        self.w_h = nn.Linear(hidden_size, g, bias=False)
        self.bias = nn.Parameter(torch.zeros(g))
        self.norm_x = norm(g, RECURRENT, steps)
        self.norm_h = norm(g, RECURRENT, steps)
        self.norm_c = norm(hidden_size, RECURRENT, steps)

    def reset_cell_parameters(self) -> None:
        with torch.no_grad():
            self.bias.zero_()
            self.bias[self.hidden_size: 2 * self.hidden_size] = 1.0  # forget gate starts open

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, n, _ = x.shape  # (T, N, input_size)
        xs = self.norm_x(self.w_x(x)) + self.bias  # (T, N, 4H), all steps at once
        h = c = x.new_zeros(n, self.hidden_size)
        for t in range(steps):
            gates = xs[t] + self.norm_h(self.w_h(h), t)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.norm_c(c, t))
        return h


class NormGRU(nn.Module):
    gates = 3

    def __init__(self, input_size: int, hidden_size: int, steps: int, norm: NormFactory):
        super().__init__()
        g = self.gates * hidden_size
        self.hidden_size = hidden_size
        self.w_x = nn.Linear(input_size, g, bias=False)
        self.w_h = nn.Linear(hidden_size, g, bias=False)
        self.bias = nn.Parameter(torch.zeros(g))
        self.bias_hn = nn.Parameter(torch.zeros(hidden_size))
        self.norm_x = norm(g, RECURRENT, steps)
        self.norm_h = norm(g, RECURRENT, steps)

    def reset_cell_parameters(self) -> None:
        with torch.no_grad():
            self.bias.zero_()
            self.bias_hn.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, n, _ = x.shape  # (T, N, input_size)
        xs = self.norm_x(self.w_x(x)) + self.bias  # (T, N, 3H)
        h = x.new_zeros(n, self.hidden_size)
        for t in range(steps):
            x_r, x_z, x_n = xs[t].chunk(3, dim=1)
            h_r, h_z, h_n = self.norm_h(self.w_h(h), t).chunk(3, dim=1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            cand = torch.tanh(x_n + r * (h_n + self.bias_hn))
            h = (1 - z) * cand + z * h
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
