"""Noisy BN's noise (Santurkar et al. 2018, section 2: injecting internal covariate shift).

Right after a norm layer (before its activation), training adds to every activation of every
sample i.i.d. noise whose distribution changes at each training forward: per channel, a mean drawn
from U(-mean, mean) and a std from U(0, std), then ``x + mean_c + std_c * N(0, 1)`` for each value
(each position too, on conv features). Evaluation adds nothing. The draws come from a generator of
the layer's own, seeded from the run seed and the layer's name (`seed_noise`), so no other random
stream of the run moves; its state is saved with the model, so a resumed run draws what it would have.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn


class NormNoise(nn.Module):
    def __init__(self, num_features: int, mean: float, std: float):
        super().__init__()
        self.num_features, self.mean, self.std = num_features, mean, std
        self.seed = 0
        self.generator: torch.Generator | None = None
        self._state: torch.Tensor | None = None  # a loaded generator state, applied at the next draw

    def reseed(self, seed: int, name: str) -> None:
        """Seed the generator from (run seed, layer name), as `seeded_init` does the weights."""
        self.seed, self.generator, self._state = zlib.crc32(f"{seed}:noise:{name}".encode()), None, None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(self.seed)
        if self._state is not None:
            self.generator.set_state(self._state)
            self._state = None
        return self.generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        g = self._generator(x.device)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = (torch.rand(self.num_features, generator=g, device=x.device, dtype=x.dtype) * 2 - 1) * self.mean
        std = torch.rand(self.num_features, generator=g, device=x.device, dtype=x.dtype) * self.std
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return torch.addcmul(x + mean.view(shape), noise, std.view(shape))

    def get_extra_state(self) -> dict:
        state = self.generator.get_state() if self.generator is not None else self._state
        return {"seed": self.seed, "generator": state}

    def set_extra_state(self, state: dict) -> None:
        self.seed, self.generator, self._state = state["seed"], None, state["generator"]

    def extra_repr(self) -> str:
        return f"{self.num_features}, mean={self.mean}, std={self.std}"
