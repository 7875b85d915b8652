"""Typed config schemas and Hydra composition.

* `schemas`: the dataclass schema of each config group choice, registered in Hydra's ConfigStore on import.
* `rules`: what every value means (`RULES`, `validate`): ranges, finiteness, a device this machine has.
* `safety`: before Hydra reads anything, user input that could make it import or run code is refused.
* `composition`: `compose` returns plain validated dataclasses; no DictConfig travels past it.
* `messages`: Hydra/OmegaConf/YAML errors as one clear line.
* `ids`: the config as a plain dict, its hash and the run id.
"""

from normbench.config.schemas import (
    GROUPS, SCHEMA_PREFIX, SCHEMAS, AdamConfig, BNConfig, BRNConfig, Cell, CNNConfig, Compile, Config, DataConfig,
    EvalConfig, EvoNormConfig, FusedActConfig, GNConfig, LrScaling, MLPConfig, NoiseConfig, NormConfig, OptimConfig,
    PerfConfig, Position, Precision, RecurrentStats, Residual, ResNetConfig, RNNConfig, Schedule, SGDConfig,
    SyntheticConfig, register_schemas,
)
from normbench.config.messages import clean_hydra_error
from normbench.config.rules import (
    AT_LEAST_ONE, DATASET_CLASSES, FOLDER, MAX_SEED, NON_NEGATIVE, POSITIVE, RULES, SEED, SHIFT_SEVERITY, SHIFTS,
    UNIT_CLOSED_OPEN, UNIT_OPEN_CLOSED, Must, optional, parse_shift, shift_name, validate,
)
from normbench.config.safety import (
    INSTANTIATED_HYDRA_KEYS, RUNS_CODE, USER_HYDRA_KEYS, check_config_dir, check_overrides, search_path_overrides,
)
from normbench.config.composition import CONFIG_MODULE, compose, to_config
from normbench.config.ids import (
    HASHED_WHEN_SET, NOT_HASHED, config_hash, dict_hash, effective_lr, legacy_run_id, run_id, to_dict,
)

__all__ = [
    "AT_LEAST_ONE", "CONFIG_MODULE", "DATASET_CLASSES", "FOLDER", "GROUPS", "HASHED_WHEN_SET", "INSTANTIATED_HYDRA_KEYS",
    "MAX_SEED", "NON_NEGATIVE", "NOT_HASHED", "POSITIVE", "RULES", "RUNS_CODE", "SCHEMAS", "SCHEMA_PREFIX", "SEED",
    "SHIFTS", "SHIFT_SEVERITY", "UNIT_CLOSED_OPEN", "UNIT_OPEN_CLOSED", "USER_HYDRA_KEYS",
    "AdamConfig", "BNConfig", "BRNConfig", "CNNConfig", "Cell", "Compile", "Config", "DataConfig", "EvalConfig",
    "EvoNormConfig", "FusedActConfig", "GNConfig", "LrScaling", "MLPConfig", "Must", "NoiseConfig", "NormConfig",
    "OptimConfig", "PerfConfig", "Position", "Precision", "RNNConfig", "RecurrentStats", "ResNetConfig", "Residual",
    "SGDConfig", "Schedule", "SyntheticConfig",
    "check_config_dir", "check_overrides", "clean_hydra_error", "compose", "config_hash", "dict_hash", "effective_lr",
    "legacy_run_id", "optional", "parse_shift", "register_schemas", "run_id", "search_path_overrides", "shift_name", "to_config",
    "to_dict", "validate",
]
