"""Test-time input shifts: the test images changed in the space the model sees, then evaluated.

Shifts act on the normalized test images (each channel standardized with the training set's
mean and std by `data.load_data`), so a severity is in units of the training set's pixel std.
For a test image x (C, H, W) and m its own per-channel mean over H x W:

* ``contrast:s``    x' = m + s (x - m), s > 0: the image's contrast scaled by s around its own mean,
                    per channel (the instance-specific contrast instance norm removes, Ulyanov et al. 2016);
* ``brightness:b``  x' = x + b: every pixel offset by b training pixel stds (any b);
* ``noise:sigma``   x' = x + sigma * e, sigma >= 0, e ~ N(0, 1) i.i.d. per pixel, drawn on the CPU from a
                    generator seeded by the run's seed: the same e for every norm, device and sigma.

Nothing is clipped to the pixel range, so each shift is exactly the map above; contrast:1,
brightness:0 and noise:0 leave the images unchanged.

After the last epoch each shift gives ``test_acc`` (eval mode) and, for models with BN running
averages, ``test_acc_adapted``: test-time BN adaptation (Schneider et al. 2020, arXiv 2006.16971).
BN's statistics are recomputed over the whole shifted test set (inputs only, no labels) with
PreciseBN's machinery (`evaluation.recomputed_statistics`), the shifted test set is evaluated, and the
running averages are restored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from normbench.evaluation import evaluate, has_running_stats, recomputed_statistics
from normbench.config import Config, parse_shift, shift_name
from normbench.data import Data

NOISE_SEED = 3_000_017  # offset of the seed of the noise generator, apart from the training streams'


def contrast(x: torch.Tensor, s: float) -> torch.Tensor:
    mean = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1): each image's own mean, per channel
    return mean + s * (x - mean)


def brightness(x: torch.Tensor, b: float) -> torch.Tensor:
    return x + b


def noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    e = torch.randn(x.shape, generator=generator, dtype=x.dtype)  # on the CPU: the same on every device
    return x + sigma * e.to(x.device)


SHIFTS: dict[str, Callable[..., torch.Tensor]] = {"contrast": contrast, "brightness": brightness, "noise": noise}


def shifted(x: torch.Tensor, text: str, seed: int) -> torch.Tensor:
    """The images `x` (N, C, H, W) under the shift `text` ('contrast:0.5'), validated at compose time."""
    kind, severity = parse_shift(text)
    if kind == "noise":
        return noise(x, severity, torch.Generator().manual_seed(seed + NOISE_SEED))
    return SHIFTS[kind](x, severity)


def evaluate_shifts(model: nn.Module, data: Data, cfg: Config) -> dict[str, dict[str, float | None]]:
    """{canonical shift name: {test_acc, test_acc_adapted}} for every shift in `cfg.eval.shifts`
    (percent; test_acc_adapted is None without BN running averages). Nothing runs when there is none."""
    out = {}
    for text in cfg.eval.shifts:
        x = shifted(data.test_x, text, cfg.seed)
        result = {"test_acc": evaluate(model, x, data.test_y, cfg.eval_batch_size)[1], "test_acc_adapted": None}
        if has_running_stats(model):
            with recomputed_statistics(model, x, cfg.eval_batch_size):
                result["test_acc_adapted"] = evaluate(model, x, data.test_y, cfg.eval_batch_size)[1]
        out[shift_name(*parse_shift(text))] = result
    return out
