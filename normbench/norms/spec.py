"""What a norm entry is: the kinds of features, the options every builder reads, and the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from normbench.errors import UserError
from normbench.registry import Registry

FLAT, SPATIAL, RECURRENT = "flat", "spatial", "recurrent"
KINDS = (FLAT, SPATIAL, RECURRENT)

NORMS: Registry = Registry("norm")


@dataclass(frozen=True)
class NormOptions:
    eps: float = 1e-5
    momentum: float | None = 0.1
    track_running_stats: bool = True
    num_groups: int = 32
    recurrent_stats: str = "per_step"  # per_step | shared
    r_max: float = 3.0  # brn: clip limits reached after warmup_steps
    d_max: float = 5.0
    warmup_steps: int = 5000
    # (mean, std) magnitudes of the noise after the norm (Santurkar et al. 2018); (0, 0): none.
    # The config's norm.noise (an object with .mean and .std) is stored as this pair.
    noise: tuple[float, float] = (0.0, 0.0)
    # A plugin norm's own options (an instance of the dataclass it registered); None for built-in norms.
    extra: object = field(default=None, hash=False)

    def __post_init__(self):
        if not isinstance(self.noise, tuple):
            object.__setattr__(self, "noise", (float(self.noise.mean), float(self.noise.std)))


@dataclass(frozen=True)
class NormSpec:
    """A registry entry: the builder, and what a model needs to know about the norm without its name.

    centers: it removes a per-channel constant, so a bias right before it is wasted.
    activation: it ends with its own activation (FRN's TLU, EvoNorm's sigmoid gate): no ReLU after.
    standardize: the conv/linear layers feeding it standardize their weights (WS).
    """

    build: Callable[..., nn.Module]
    centers: bool = True
    activation: bool = False
    standardize: bool = False

    def __call__(self, c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
        return self.build(c, kind, opts, steps)


def norm(name: str, centers: bool = True, activation: bool = False, standardize: bool = False):
    """Register the decorated builder ``(num_features, kind, options, steps) -> module`` as norm `name`."""

    def decorator(build):
        NORMS.register(name)(NormSpec(build, centers, activation, standardize))
        return build

    return decorator


def undefined(name: str, kind: str, what: str, use: str) -> UserError:
    """The one-line refusal of a norm on a kind of features it does not define."""
    return UserError(f"norm '{name}' ({what}) is undefined on {kind} features: {use}")
