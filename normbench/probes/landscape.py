"""The loss landscape along the gradient (Santurkar et al. 2018, arXiv 1805.11604, §3.1 and Figure 4).

At step t, on the step's batch, with all parameters w and the gradient g = grad L(w), for each step size
eta = m * lr (m in `probes.landscape.lr_multiples`, lr the step's learning rate):

* ``loss`` at ``lr_multiple`` m: L(w - eta g); at m = 0, L(w);
* ``grad_change`` at m: ||grad L(w - eta g) - g||_2.

And over the step sizes:

* ``loss_range``: max - min of L(w - eta g) (the shaded band of Figure 4a);
* ``grad_predictiveness``: max ||grad L(w - eta g) - g||_2 (Figure 4b);
* ``beta_smoothness``: max ||grad L(w - eta g) - g||_2 / ||eta g||_2, the "effective" beta-smoothness
  (Figure 4c);
* ``grad_norm``: ||g||_2.

Every evaluation starts from the step's exact state (BN buffers, noise draw), in the step's mode, so the
points differ only in the weights. The direction is the plain gradient, not the optimizer's update.
"""

from __future__ import annotations

import math

import torch

from normbench.probes.base import StepView, gradient, norm2

KEYS = ("quantity", "lr_multiple")


def applies(cfg) -> str | None:
    return None


class Landscape:
    name = "landscape"

    def __init__(self, options, cfg, model, data):
        self.multiples = sorted(float(m) for m in options.lr_multiples)

    def measure(self, view: StepView) -> list[dict]:
        params = list(view.model.parameters())
        loss0, g = view.gradients(params)
        g_norm = norm2(g)
        rows = [self._row("loss", 0.0, loss0), self._row("grad_norm", math.nan, g_norm)]
        losses, changes, betas = [], [], []
        for m in self.multiples:
            eta = m * view.lr
            view.state.restore_model()
            with torch.no_grad():
                for p, gp in zip(params, g):
                    p.sub_(gp, alpha=eta)
            loss = view.loss()
            moved = gradient(loss, params)
            change = norm2([a - b for a, b in zip(moved, g)])
            losses.append(loss.item())
            changes.append(change)
            betas.append(change / (eta * g_norm) if eta * g_norm > 0 else math.nan)
            rows += [self._row("loss", m, losses[-1]), self._row("grad_change", m, change)]
        rows += [self._row("loss_range", math.nan, max(losses) - min(losses)),
                 self._row("grad_predictiveness", math.nan, max(changes)),
                 self._row("beta_smoothness", math.nan, max(betas))]
        return rows

    @staticmethod
    def _row(quantity: str, multiple: float, value: float) -> dict:
        return {"layer": "all", "depth": 0, "quantity": quantity, "lr_multiple": multiple, "value": value}
