"""Every normalization normbench compares, behind one factory.

Most compute ``(x - mean) / sqrt(var + eps)`` and then apply a learnable per-channel scale
(gamma) and shift (beta). They differ in the set of values the statistics are taken over, and
that set depends on where the norm sits:

========== ======================= =========================== ===================================
name       flat ``(N, C)``          spatial ``(N, C, H, W)``     recurrent (per time step, ``(N, C)``)
========== ======================= =========================== ===================================
bn         BatchNorm1d: over N      BatchNorm2d: over N, H, W    recurrent BN (Cooijmans et al. 2016):
           (or over ghost sub-      (or ghost sub-batches of     over N (or ghost sub-batches),
           batches of               norm_batch_size) x H x W     separate running averages per time
           norm_batch_size)                                      step (or shared, by flag), gamma 0.1
brn        batch renorm (Ioffe      batch renorm over N, H, W    refused (not implemented)
           2017) over N: BN with
           r, d corrections
           towards the running
           averages; BN at eval
ln         LayerNorm(C)            GroupNorm(1, C): over        LayerNorm(C) on the gate
                                    C, H, W of each sample,      pre-activations (Ba et al. 2016)
                                    per-channel affine
in         refused (undefined)     InstanceNorm2d(affine=True)  refused (undefined)
gn         GroupNorm(G, C)         GroupNorm(G, C)              GroupNorm(G, C) on the gate
                                                                 pre-activations
ws_gn      GroupNorm(G, C) after   GroupNorm(G, C) after        refused (the cells' projections
           weight-standardized     weight-standardized convs    are not standardized)
           linear layers
rms        RMSNorm over C: no      RMSNorm over C, H, W of      RMSNorm(C) on the gate
           mean, no shift          each sample                  pre-activations
frn        refused (undefined)     FRN + TLU: mean square over  refused (undefined)
                                    H, W per sample and
                                    channel; replaces the ReLU
evonorm_s0 refused (undefined)     EvoNorm-S0: x sigmoid(v x)   refused (undefined)
                                    over the group std (C/G,
                                    H, W); replaces the ReLU
none       identity                identity                     identity
========== ======================= =========================== ===================================

Training-time normalization uses the biased variance (divide by m); BN's running variance
accumulates the unbiased one (divide by m - 1), as in PyTorch. BN's momentum 0.1 keeps 0.9 of
the old running value at each update; with ghost sub-batches it is updated once per sub-batch
(`batch.py`). Each entry's module docstring gives its formula: `batch.py` (bn, ghost BN,
recurrent BN), `renorm.py` (brn), `group.py` (ln, in, gn, rms, none), `standardize.py` (ws_gn),
`response.py` (frn, evonorm_s0), `noise.py` (norm.noise, after any norm on flat or conv features).

Models get a `NormFactory` and never ask which norm it is: `factory(C, kind)` is the norm,
`factory.block(C, kind)` the norm with its activation (FRN and EvoNorm bring their own),
`factory.linear(...)` / `factory.conv(...)` the layers that feed a norm (weight-standardized for
ws_gn), and `factory.bias` whether those layers need a bias.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from normbench.errors import UserError
from normbench.norms.batch import BatchNorm1d, BatchNorm2d, RecurrentBatchNorm, batch_moments, norm_batches
from normbench.norms.ghost import ghost_batch_norm
from normbench.norms.group import GroupNorm, RMSNorm, StepNorm
from normbench.norms.noise import NormNoise
from normbench.norms.renorm import BatchRenorm1d, BatchRenorm2d
from normbench.norms.response import EvoNormS0, FilterResponseNorm
from normbench.norms.spec import FLAT, KINDS, NORMS, RECURRENT, SPATIAL, NormOptions, NormSpec
from normbench.norms.standardize import WSConv2d, WSLinear, standardized
from normbench.norms.validate import validate_norms

__all__ = ["FLAT", "KINDS", "NORMS", "RECURRENT", "SPATIAL", "NORM_TYPES", "BatchNorm1d", "BatchNorm2d",
           "BatchRenorm1d", "BatchRenorm2d", "EvoNormS0", "FilterResponseNorm", "GroupNorm", "NormFactory",
           "NormNoise", "NormOptions", "NormSpec", "RMSNorm", "RecurrentBatchNorm", "StepNorm", "WSConv2d",
           "WSLinear", "batch_moments", "create_norm", "ghost_batch_norm", "is_norm", "norm_batches",
           "standardized", "validate_norms"]

# Every module a norm is made of: what `create_norm` builds, and PyTorch's own norms.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, GroupNorm, StepNorm, RecurrentBatchNorm,
              RMSNorm, FilterResponseNorm, EvoNormS0)


def is_norm(module: nn.Module) -> bool:
    """A norm layer: one of NORM_TYPES, or what a plugin's norm builder returned."""
    return isinstance(module, NORM_TYPES) or getattr(module, "_normbench_norm", False) is True


def create_norm(name: str, num_features: int, kind: str, options: NormOptions = NormOptions(),
                steps: int | None = None) -> nn.Module:
    """Build norm `name` for `num_features` channels of the given kind (flat, spatial or recurrent).

    Recurrent norms take ``(x, t)``; `steps` is the sequence length, for per-step statistics.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    layer = NORMS.get(name)(num_features, kind, options, steps)
    if kind == RECURRENT and not isinstance(layer, RecurrentBatchNorm):
        layer = StepNorm(layer)
    return layer


@dataclass(frozen=True)
class NormFactory:
    """`create_norm` bound to one norm config: what models receive. Models never branch on the name."""

    name: str
    options: NormOptions = NormOptions()
    position: str = "pre_act"  # pre_act: layer -> norm -> ReLU; post_act: layer -> ReLU -> norm

    @property
    def spec(self) -> NormSpec:
        return NORMS.get(self.name)

    def __call__(self, num_features: int, kind: str, steps: int | None = None) -> nn.Module:
        """The norm, followed by its noise when norm.noise is on (flat and conv features only)."""
        layer = create_norm(self.name, num_features, kind, self.options, steps)
        if not any(self.options.noise):
            return layer
        if kind == RECURRENT:
            raise UserError("norm.noise is not available inside recurrent cells (model=rnn): "
                            "use it with model=mlp, cnn or resnet20")
        return nn.Sequential(layer, NormNoise(num_features, *self.options.noise))

    @property
    def bias(self) -> bool:
        """Whether a conv/linear layer before this norm needs a bias: a norm right after it that
        removes a per-channel constant makes one useless; with post_act the ReLU sits between."""
        return not self.spec.centers or self.position == "post_act"

    def linear(self, in_features: int, out_features: int, bias: bool | None = None) -> nn.Linear:
        """A linear layer that feeds this norm; `bias` None: `self.bias`."""
        cls = WSLinear if self.spec.standardize else nn.Linear
        return cls(in_features, out_features, bias=self.bias if bias is None else bias)

    def conv(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, padding: int = 0,
             bias: bool | None = None) -> nn.Conv2d:
        """A conv layer that feeds this norm; `bias` None: `self.bias`."""
        cls = WSConv2d if self.spec.standardize else nn.Conv2d
        return cls(c_in, c_out, kernel_size, stride=stride, padding=padding,
                   bias=self.bias if bias is None else bias)

    def block(self, num_features: int, kind: str) -> nn.Sequential:
        """The norm and a ReLU, in the configured order; a norm with its own activation alone."""
        norm = self(num_features, kind)
        if self.spec.activation:
            return nn.Sequential(norm)
        act = nn.ReLU(inplace=False)
        return nn.Sequential(norm, act) if self.position == "pre_act" else nn.Sequential(act, norm)
