"""The scale of each residual branch against its skip path (De & Smith 2020, arXiv 2002.10444, §2 and its
Figure 2: batch norm downscales the residual branch, increasingly with depth; SkipInit, §4, starts it at 0).

At step t, on the step's batch and in the step's mode, for every block of `resnet20`, whose output is
relu(skip(x) + F(x)):

* ``var_branch``: Var(F(x)), with F(x) the branch as it is added (after its last norm, its noise, and
  SkipInit's alpha);
* ``var_skip``: Var(skip(x)), the shortcut as it is added (x itself, or option A's subsampled, zero-padded x);
* ``ratio``: var_branch / var_skip.

Var is each channel's biased variance over the batch and positions, averaged over channels.
"""

from __future__ import annotations

import math

import torch

from normbench.probes.base import StepView, hooked

KEYS = ("quantity",)


def applies(cfg) -> str | None:
    if cfg.model.name != "resnet20":
        return (f"probes.residual measures residual blocks, which only model=resnet20 has, not "
                f"model={cfg.model.name}")
    return None


def _channel_var(x: torch.Tensor) -> float:
    """Mean over channels of each channel's biased variance over (N, H, W); x is (N, C, H, W)."""
    return float(x.double().transpose(0, 1).flatten(1).var(1, correction=0).mean())


class Residual:
    name = "residual"

    def __init__(self, options, cfg, model, data):
        pass

    def measure(self, view: StepView) -> list[dict]:
        blocks = [(n, m) for n, m in view.model.named_modules() if hasattr(m, "shortcut") and hasattr(m, "norm2")]
        seen: dict[str, dict] = {}

        def capture(name, block):
            def branch_out(module, args, out):
                seen[name]["branch"] = out if block.alpha is None else block.alpha * out

            def block_in(module, args):
                seen[name] = {"skip": block.shortcut(args[0])}
            return block.register_forward_pre_hook(block_in), block.norm2.register_forward_hook(branch_out)

        handles = [h for n, b in blocks for h in capture(n, b)]
        view.state.restore_model()
        with hooked(handles), torch.no_grad():
            view.loss()
        rows = []
        for depth, (name, _) in enumerate(blocks):
            branch, skip = _channel_var(seen[name]["branch"]), _channel_var(seen[name]["skip"])
            ratio = branch / skip if skip > 0 else math.nan
            for quantity, value in (("var_branch", branch), ("var_skip", skip), ("ratio", ratio)):
                rows.append({"layer": name, "depth": depth, "quantity": quantity, "value": value})
        return rows
