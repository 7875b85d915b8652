"""Internal covariate shift as a gradient difference (Santurkar et al. 2018, arXiv 1805.11604, §2.2,
Definition 2.1).

For layer i at step t, with the step's batch (x, y):

* ``G  = grad_{W_i} L(W_1^t, ..., W_k^t; x, y)``: every layer at step t;
* ``G' = grad_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t; x, y)``: the layers before i have
  taken their update of this step, the rest have not.

The update is the optimizer's own step from G (momentum, Adam's moments and weight decay included),
taken and then undone. Rows per conv/linear layer: ``l2_diff`` = ||G - G'||_2, ``cosine`` = cos(G, G'),
and ``grad_norm`` = ||G||_2, over the layer's weight. A layer is a conv or linear module together with
every parameter that runs after it and before the next one (its norm's scale and shift, SkipInit's
alpha), in the order of the forward. For the first layer nothing comes before it, so G' = G exactly.

Not for `rnn`: a recurrent cell applies its weights at every step, so no layer comes before another.
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.probes.base import StepView, gradient, hooked, weight_layers

KEYS = ("quantity",)


def applies(cfg) -> str | None:
    if cfg.model.name == "rnn":
        return ("probes.ics needs layers that run one after another; model=rnn applies its cell's weights at "
                "every time step, so no layer comes before another (use it with mlp, cnn or resnet20)")
    return None


def _forward_order(view: StepView) -> list[nn.Module]:
    """Modules that own parameters, in the order their forward finishes (one forward, no grad)."""
    order: list[nn.Module] = []
    owners = [m for m in view.model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(lambda m, i, o: order.append(m) if m not in order else None)
               for m in owners]
    view.state.restore_model()
    with hooked(handles), torch.no_grad():
        view.loss()
    return order


def _layer_groups(view: StepView) -> list[tuple[str, nn.Module, list[nn.Parameter]]]:
    """(name, conv/linear module, every parameter of its layer) in forward order."""
    names = {id(m): n for n, m in weight_layers(view.model)}
    groups: list[tuple[str, nn.Module, list[nn.Parameter]]] = []
    for m in _forward_order(view):
        own = list(m.parameters(recurse=False))
        if id(m) in names or not groups:
            groups.append((names.get(id(m), ""), m, own))
        else:
            groups[-1][2].extend(own)
    return groups


def _updated(view: StepView, params: list[nn.Parameter], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters after this step's optimizer update from `grads`; the caller restores the state."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    view.optimizer.step()
    return [p.detach().clone() for p in params]


class ICS:
    name = "ics"

    def __init__(self, options, cfg, model, data):
        pass

    def measure(self, view: StepView) -> list[dict]:
        groups = _layer_groups(view)
        params = list(view.model.parameters())
        index = {id(p): k for k, p in enumerate(params)}
        _, g = view.gradients(params)
        after = _updated(view, params, g)
        view.state.restore()
        rows = []
        for depth, (name, layer, _) in enumerate(groups):
            view.state.restore_model()
            with torch.no_grad():
                for _, _, earlier in groups[:depth]:
                    for p in earlier:
                        p.copy_(after[index[id(p)]])
            loss = view.loss()
            k = index[id(layer.weight)]
            g_shifted = gradient(loss, params)[k].double()
            g_now = g[k].double()
            diff = float(torch.linalg.vector_norm(g_now - g_shifted))
            norms = float(torch.linalg.vector_norm(g_now)) * float(torch.linalg.vector_norm(g_shifted))
            cosine = float((g_now * g_shifted).sum()) / norms if norms > 0 else float("nan")
            for quantity, value in (("l2_diff", diff), ("cosine", cosine),
                                    ("grad_norm", float(torch.linalg.vector_norm(g_now)))):
                rows.append({"layer": name, "depth": depth, "quantity": quantity, "value": value})
        return rows
