"""The typed schemas of every config group, and their registration in Hydra's ConfigStore.

Each config group (data, model, norm, optim) has one YAML per choice in ``normbench/conf/``; each YAML
names its dataclass schema here in its defaults list, so an unknown key or a wrong type fails when the
config is composed. `register_schemas` runs when this module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

GROUPS = ("data", "model", "norm", "optim")


class Position(str, Enum):
    pre_act = "pre_act"  # layer -> norm -> ReLU
    post_act = "post_act"  # layer -> ReLU -> norm


class RecurrentStats(str, Enum):
    per_step = "per_step"
    shared = "shared"


class LrScaling(str, Enum):
    linear = "linear"
    sqrt = "sqrt"
    none = "none"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    step = "step"


class Cell(str, Enum):
    lstm = "lstm"
    gru = "gru"


class Head(str, Enum):
    gap = "gap"  # global average pooling, then a linear layer
    flatten = "flatten"  # every position's features into the linear layer (a classic small CNN)


class Residual(str, Enum):
    standard = "standard"  # x + F(x)
    skipinit = "skipinit"  # x + alpha * F(x), alpha a learnable scalar starting at 0 (De & Smith 2020)


# ---- norm -------------------------------------------------------------------------------------------


@dataclass
class NoiseConfig:
    """Noisy BN (Santurkar et al. 2018): noise added after the norm while training; both 0: none."""

    mean: float = 0.0  # each step, each channel's noise mean is drawn from U(-mean, mean)
    std: float = 0.0  # and its std from U(0, std)


@dataclass
class NormConfig:
    name: str = MISSING
    eps: float = 1e-5
    position: Position = Position.pre_act
    noise: NoiseConfig = field(default_factory=NoiseConfig)


@dataclass
class BNConfig(NormConfig):
    momentum: Optional[float] = 0.1  # weight of the new batch in the running averages; None: cumulative
    track_running_stats: bool = True
    recurrent_stats: RecurrentStats = RecurrentStats.per_step  # RNN only: per time step, or shared


@dataclass
class GNConfig(NormConfig):
    num_groups: int = 32


@dataclass
class BRNConfig(NormConfig):
    momentum: Optional[float] = 0.1  # as BN's
    r_max: float = 3.0  # clip limits of r and d, reached after warmup_steps (Ioffe 2017: 3 and 5)
    d_max: float = 5.0
    warmup_steps: int = 5000  # training steps over which the limits grow linearly from (1, 0), which is BN


@dataclass
class FusedActConfig(NormConfig):
    """A norm that replaces the activation after it (frn's TLU, evonorm_s0): position must be pre_act."""


@dataclass
class EvoNormConfig(FusedActConfig):
    num_groups: int = 32


# ---- model ------------------------------------------------------------------------------------------


@dataclass
class MLPConfig:
    name: str = "mlp"
    width: int = 256
    depth: int = 2  # hidden layers


@dataclass
class CNNConfig:
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # one stage each, 2x2 pool between
    convs_per_stage: int = 1
    # flatten: every position's channels into the linear layer; gap: their average over positions (normbench
    # 0.2's head, with which per-sample norms (ln, in, gn) left this shallow net at 13-60% on MNIST)
    head: Head = Head.flatten


@dataclass
class ResNetConfig:
    name: str = "resnet20"
    depth: int = 20  # 6n+2
    width: int = 16  # channels of the first stage; then 2x and 4x
    residual: Residual = Residual.standard


@dataclass
class RNNConfig:
    name: str = "rnn"
    cell: Cell = Cell.lstm
    hidden_size: int = 128


# ---- data -------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    name: str = MISSING
    root: Optional[str] = None  # else $NORMBENCH_DATA_DIR, else ~/.cache/normbench/data
    train_size: Optional[int] = None  # class-balanced deterministic subset; None: all
    test_size: Optional[int] = None
    augment: bool = False  # random crop (pad 4), plus horizontal flip on CIFAR
    batch_classes: Optional[int] = None  # each training batch from this many classes only; None: iid batches


@dataclass
class SyntheticConfig(DataConfig):
    shape: list[int] = field(default_factory=lambda: [1, 28, 28])  # C, H, W
    num_classes: int = 10
    num_train: int = 2048
    num_test: int = 512
    noise: float = 0.35  # std of the per-pixel noise, as a fraction of the pixel range
    data_seed: int = 0


# ---- optim ------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    name: str = MISSING
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.constant
    warmup_epochs: float = 0.0
    step_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training
    step_gamma: float = 0.1
    # weight decay of norm scales/shifts and of biases; None: the same as weight_decay (every parameter decays)
    norm_weight_decay: Optional[float] = None


@dataclass
class SGDConfig(OptimConfig):
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class AdamConfig(OptimConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


# ---- top level --------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    batch_stats: bool = True  # BN: also test with the batch's own statistics, at the training batch size
    precise_bn: bool = True  # BN: also test with population statistics recomputed after each epoch
    precise_bn_samples: int = 4096  # training samples used to recompute them
    every_epoch: bool = True  # the two extra BN evaluations after every epoch; false: after the last only
    shifts: list[str] = field(default_factory=list)  # test-time input shifts after the last epoch: KIND:SEVERITY


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16 for forward and loss


class Compile(str, Enum):
    none = "none"
    default = "default"
    reduce_overhead = "reduce-overhead"  # CUDA graphs: removes per-step launch overhead at small batch
    max_autotune = "max-autotune"


@dataclass
class PerfConfig:
    """Speed options. precision and compile change the numerics, so they are off by default."""

    precision: Precision = Precision.fp32
    compile: Compile = Compile.none  # torch.compile mode for the training step
    channels_last: bool = True  # conv nets on CUDA: NHWC memory layout (same numbers, faster kernels)


# ---- probes -----------------------------------------------------------------------------------------
# Measurements taken during training that never change the run (normbench/probes/). `every`: steps between
# two measurements, counted from step 0 (the initial weights); 0 or null: off.


@dataclass
class BatchStatsProbeConfig:
    """Batch-statistics noise at every norm layer's input (normbench/probes/batch_stats.py)."""

    every: Optional[int] = 0
    sizes: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64, 128])  # batch sizes B to measure
    samples: int = 1024  # training samples the population statistics are taken over
    quantiles: list[float] = field(default_factory=lambda: [0.5, 0.9])  # of the relative errors


@dataclass
class LandscapeProbeConfig:
    """Loss and gradient along the gradient direction (normbench/probes/landscape.py)."""

    every: Optional[int] = 0
    lr_multiples: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # step sizes, x the step's lr


@dataclass
class EveryConfig:
    """A probe whose only setting is how often it runs."""

    every: Optional[int] = 0


@dataclass
class ProbesConfig:
    batch_stats: BatchStatsProbeConfig = field(default_factory=BatchStatsProbeConfig)
    landscape: LandscapeProbeConfig = field(default_factory=LandscapeProbeConfig)
    ics: EveryConfig = field(default_factory=EveryConfig)  # internal covariate shift (probes/ics.py)
    residual: EveryConfig = field(default_factory=EveryConfig)  # residual branch scale, resnet20 (probes/residual.py)
    scales: EveryConfig = field(default_factory=EveryConfig)  # gradient and activation scale (probes/scales.py)


@dataclass
class Config:
    data: Any = MISSING
    model: Any = MISSING
    norm: Any = MISSING
    optim: Any = MISSING
    name: str = "default"  # experiment name: runs go to <results_dir>/<name>/<run_id>/
    batch_size: int = 64
    norm_batch_size: Optional[int] = None  # BN's statistics over sub-batches of this size (ghost BN); None: batch_size
    epochs: int = 10
    lr: float = 0.1  # base learning rate, at base_batch_size
    lr_scaling: LrScaling = LrScaling.linear
    base_batch_size: int = 32
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: Optional[int] = None  # CPU threads per run; None: 1 for small steps, else every core (threads.py)
    eval_batch_size: int = 128
    results_dir: str = "results"
    checkpoint: bool = True  # save the training state after every epoch, to resume a killed run
    keep_checkpoint: bool = False  # keep it once the run has finished
    tensorboard: bool = False  # per-epoch metrics as TensorBoard events in <run>/tensorboard/ (extra: tensorboard)
    eval: EvalConfig = field(default_factory=EvalConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)  # measurements that never change the run


SCHEMAS = {
    "norm": {"bn": BNConfig, "ln": NormConfig, "in": NormConfig, "gn": GNConfig, "none": NormConfig,
             "brn": BRNConfig, "ws_gn": GNConfig, "rms": NormConfig, "frn": FusedActConfig,
             "evonorm_s0": EvoNormConfig},
    "model": {"mlp": MLPConfig, "cnn": CNNConfig, "resnet20": ResNetConfig, "rnn": RNNConfig},
    "data": {"mnist": DataConfig, "fashion_mnist": DataConfig, "cifar10": DataConfig, "cifar100": DataConfig,
             "synthetic": SyntheticConfig},
    "optim": {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamConfig},
}
SCHEMA_PREFIX = "schema_"


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema_config", node=Config)
    for group, schemas in SCHEMAS.items():
        for schema in set(schemas.values()):
            cs.store(group=group, name=SCHEMA_PREFIX + schema.__name__.lower(), node=schema)


register_schemas()
