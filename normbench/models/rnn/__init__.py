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
at once before the loop. Three paths give the same numbers:

* `cells`: the modules. A cell with no norm in it is a standard LSTM/GRU and runs through
  PyTorch's fused kernel; the step loop (`_loop`) runs through the norm modules and stays for what
  the fused form cannot stand in for: norms it does not know, forward hooks or replaced forwards on
  the per-step layers (PreciseBN, the BN evaluation modes), autocast and torch.compile.
* `recurrences`: a cell with LN, GN or recurrent BN runs its recurrence as one autograd node with
  a hand-written backward.
* `step_norms`: the functional twins of the cell's norms that those recurrences call.
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.errors import UserError
from normbench.models import MODELS
from normbench.models.rnn.cells import NormGRU, NormLSTM
from normbench.norms import NormFactory

__all__ = ["CELLS", "NormGRU", "NormLSTM", "RowRNN", "rnn"]

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
