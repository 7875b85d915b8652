"""Gradient and activation scale per layer: the vanishing or exploding gradients normalization is credited
with preventing (Ioffe & Szegedy 2015, arXiv 1502.03167, §3.3, "Batch Normalization enables higher
learning rates"; Glorot & Bengio 2010 for the per-layer view).

At step t, on the step's batch and in the step's mode, for every conv and linear layer:

* ``grad_norm``: ||grad_W L||_2 of the layer's weight;
* ``weight_norm``: ||W||_2;
* ``input_std``: the standard deviation of every value the layer receives (for layers after the first,
  the previous layer's normalized, activated output);
* ``output_std``: the standard deviation of every value it produces (what its norm receives).

Standard deviations are over all values of the batch (samples, channels, positions; and time steps of a
recurrent cell, whose step loop runs for the measurement so that every step is seen).
"""

from __future__ import annotations

import math

import torch

from normbench.models import step_loop
from normbench.probes.base import StepView, hooked, weight_layers

KEYS = ("quantity",)


def applies(cfg) -> str | None:
    return None


class _Moments:
    """Count, sum and sum of squares of every value seen, over any number of calls (float64)."""

    def __init__(self):
        self.n, self.s1, self.s2 = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        self.n += x.numel()
        self.s1 += float(x.sum())
        self.s2 += float((x * x).sum())

    def std(self) -> float:
        if self.n == 0:
            return math.nan
        mean = self.s1 / self.n
        return math.sqrt(max(self.s2 / self.n - mean * mean, 0.0))


class Scales:
    name = "scales"

    def __init__(self, options, cfg, model, data):
        pass

    def measure(self, view: StepView) -> list[dict]:
        layers = weight_layers(view.model)
        inputs = [_Moments() for _ in layers]
        outputs = [_Moments() for _ in layers]

        def watch(k):
            def hook(module, args, out):
                inputs[k].add(args[0])
                outputs[k].add(out)
            return hook

        handles = [m.register_forward_hook(watch(k)) for k, (_, m) in enumerate(layers)]
        weights = [m.weight for _, m in layers]
        with hooked(handles), step_loop(view.model):
            _, grads = view.gradients(weights)
        rows = []
        for depth, ((name, m), g) in enumerate(zip(layers, grads)):
            for quantity, value in (("grad_norm", float(torch.linalg.vector_norm(g.double()))),
                                    ("weight_norm", float(torch.linalg.vector_norm(m.weight.detach().double()))),
                                    ("input_std", inputs[depth].std()), ("output_std", outputs[depth].std())):
                rows.append({"layer": name, "depth": depth, "quantity": quantity, "value": value})
        return rows
