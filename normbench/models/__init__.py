"""Model registry. Every model takes (config, input shape, class count, norm factory).

Models ask the norm factory for a norm and never branch on which norm it is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
import zlib

import torch
from torch import nn

from normbench.norms import NormFactory, NormNoise, validate_norms
from normbench.registry import Registry

MODELS: Registry = Registry("model")

# seeded_init seeds torch's global generator layer by layer. A sequential sweep plans (and so builds
# models) in a thread while it trains; two builds must not interleave their seeding.
_SEEDING = threading.Lock()

# Importing the modules registers their models.
from normbench.models import cnn, mlp, resnet, rnn  # noqa: E402,F401


def seeded_init(model: nn.Module, seed: int) -> None:
    """Re-initialize each conv/linear layer from a seed derived from (seed, layer name).

    The same seed then gives the same weights to same-named layers whatever the
    norm (a norm's own parameters start at fixed values), and whether or not a
    layer has a bias.
    """
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            module.reset_parameters()
    for name, module in model.named_modules():
        if hasattr(module, "reset_cell_parameters"):
            module.reset_cell_parameters()
        if isinstance(module, NormNoise):  # norm.noise draws from a stream of its own, seeded likewise
            module.reseed(seed, name)


def build_model(cfg, input_shape: tuple[int, int, int], num_classes: int, norm: NormFactory,
                seed: int) -> nn.Module:
    """Build model `cfg.name`, validate its norms, and initialize it from `seed`."""
    model = MODELS.get(cfg.name)(cfg, input_shape, num_classes, norm)
    validate_norms(model, input_shape)
    with _SEEDING:
        seeded_init(model, seed)
    return model


@contextmanager
def step_loop(model: nn.Module) -> Iterator[None]:
    """Within it, recurrent cells run their plain step loop through their modules (not a fused recurrence),
    so forward hooks see every step."""
    looped = [m for m in model.modules() if hasattr(m, "use_loop")]
    for m in looped:
        m.use_loop = True
    try:
        yield
    finally:
        for m in looped:
            del m.use_loop  # back to the class's default


def forward_work(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(module calls, multiply-accumulates) of one sample's forward pass: the two things a training step's
    time grows with (per-call overhead, arithmetic). Conv and linear layers are counted; a cell that
    would run a fused kernel is counted on its step loop, which does the same arithmetic."""
    calls = macs = 0

    def count(module, inputs, output):
        nonlocal calls, macs
        calls += 1
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            macs += module.weight.numel() * (output.numel() // module.weight.shape[0])

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with step_loop(model), torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls, macs


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
