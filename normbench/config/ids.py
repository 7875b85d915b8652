"""Run identity: the config as a plain dict, its hash (what is and is not hashed), the norm's label, the run
id, and the effective learning rate the run trains with."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from importlib import resources

import yaml

from normbench.config.schemas import GROUPS, SCHEMA_PREFIX, SCHEMAS, Config


def effective_lr(cfg: Config) -> float:
    """The base lr scaled to the batch size: linear (GN paper: 0.1 * B / 32), sqrt, or none."""
    ratio = cfg.batch_size / cfg.base_batch_size
    return cfg.lr * {"linear": ratio, "sqrt": ratio**0.5, "none": 1.0}[cfg.lr_scaling.value]


def to_dict(cfg: Config) -> dict:
    """Plain, JSON-safe dict of the config (enums as their values).

    A choice that a plugin registered also records the plugin's name and a hash of its source
    (``norm.plugin: {name, source}``): it is hashed with the rest, so a run of changed plugin code gets a
    run id of its own. Built-in choices record nothing more (their run ids are unchanged)."""
    d = json.loads(json.dumps(asdict(cfg), default=lambda v: v.value))
    from normbench.plugins import provenance_record

    for group in GROUPS:
        record = provenance_record(group, d[group]["name"]) if isinstance(d.get(group), dict) else None
        if record is not None:
            d[group]["plugin"] = record
    return d


# Settings that say where things go or how they are shown, not what is computed.
NOT_HASHED = ("name", "results_dir", "device", "data.root", "checkpoint", "keep_checkpoint", "perf.channels_last",
              "tensorboard", "threads")


# Settings added after results existed, hashed only when they differ from their default (which is the
# behaviour before they existed), so adding a knob never orphans a finished run.
# A key a config does not have (model.residual on a model other than resnet20) is not hashed either.
HASHED_WHEN_SET = {"optim.norm_weight_decay": None, "data.batch_classes": None, "eval.shifts": [],
                   "norm_batch_size": None, "norm.noise": {"mean": 0.0, "std": 0.0},
                   "model.residual": "standard", "model.head": "gap"}
_ABSENT = object()


def _pop(d: dict, key: str, absent=None):
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.get(p, {})
    return d.pop(leaf, absent)


def config_hash(cfg: Config) -> str:
    """Hash of every setting that changes the result; output locations and the device are left out."""
    return dict_hash(to_dict(cfg))


def dict_hash(config: dict) -> str:
    """`config_hash` of a config as `to_dict` gives it (e.g. read back from a summary.json)."""
    d = json.loads(json.dumps(config))
    for key in NOT_HASHED:
        _pop(d, key)
    if d.get("norm_batch_size") == d.get("batch_size"):
        d["norm_batch_size"] = None  # a normalization batch of the whole batch is plain BN: the same run
    for key, default in HASHED_WHEN_SET.items():
        value = _pop(d, key, _ABSENT)
        if value is not _ABSENT and value != default:
            d[key] = value
    # Probes never change a run's metrics, but a run with a probe on has its tables and one without has
    # not: the probes that are on (with their settings) are hashed, those that are off are not.
    probes_on = {name: p for name, p in (_pop(d, "probes", None) or {}).items() if isinstance(p, dict) and p.get("every")}
    if probes_on:
        d["probes"] = probes_on
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _plain(value):
    """JSON-safe, enums as their values (as `to_dict` writes them)."""
    return json.loads(json.dumps(value, default=lambda v: v.value))


@functools.cache
def packaged_norms() -> dict[str, dict]:
    """Every packaged norm option (normbench/conf/norm/NAME.yaml) -> its settings, as `to_dict` writes them.

    Each file's defaults list names a schema (its defaults) or another option (gn8 starts from gn),
    with `_self_` last: the file's own values come after them.
    """
    folder = resources.files("normbench.conf") / "norm"
    files = {e.name[:-5]: yaml.safe_load(e.read_text()) for e in folder.iterdir() if e.name.endswith(".yaml")}
    schemas = {SCHEMA_PREFIX + s.__name__.lower(): s for s in SCHEMAS["norm"].values()}

    def settings(option: str) -> dict:
        text = dict(files[option])
        values: dict = {}
        for base in text.pop("defaults", []):
            if base in schemas:
                values.update(_plain(asdict(schemas[base]())))
            elif base != "_self_":
                values.update(settings(base))
        return {**values, **_plain(text)}

    return {option: settings(option) for option in sorted(files)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _yaml_value(v) -> str:
    """A value as it is written in an override: 4, 0.001, 1e-06, true, null, shared."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def norm_label(norm: dict) -> str:
    """The one name of a norm's settings, used in run ids, tables, figures, the report and the terminal.

    * The norm's own name ('gn') when its settings are those of the packaged option of that name
      (normbench/conf/norm/gn.yaml): today's run ids of such runs are kept.
    * The packaged option's name when the settings are exactly those of another packaged option:
      'gn8' (gn with 8 groups), 'bn_shared'.
    * Otherwise the name with each setting that differs from its packaged option, as an override
      would set it, keys sorted: 'gn(num_groups=4)', 'bn(momentum=0.01,track_running_stats=false)'.
      Parentheses, not brackets: Rich reads '[num_groups=4]' as a style tag and prints 'gn'.

    A run records its settings, not the file they came from, so an option from a user's --config-dir
    (gn4.yaml: gn with num_groups 4) is named by its settings, 'gn(num_groups=4)', exactly as
    ``norm=gn norm.num_groups=4`` is: the same settings always get the same label. A setting the run
    does not record (a summary written before the setting existed) counts as its default.
    """
    norm = _plain(norm)
    recorded = norm.pop("plugin", None)  # the plugin's code is in the hash, not the label
    name = str(norm.get("name"))
    options = packaged_norms()
    plugin = SCHEMAS["norm"].get(name) if name not in options else None
    if plugin is not None:  # a plugin's norm: named by what differs from its options' defaults
        options = {**options, name: _plain(asdict(plugin()))}
    elif recorded is not None and name not in options:  # its plugin is not loaded: its own keys are shown
        from normbench.config.schemas import NormConfig

        options = {**options, name: {**_plain(asdict(NormConfig())), "name": name}}
    for option in sorted(options, key=lambda o: o != name):  # the plain name first
        if options[option] == {**options[option], **norm} and options[option].get("name") == name:
            return option
    reference = _flat(options.get(name, {"name": name}))
    differs = {k: v for k, v in _flat(norm).items() if k not in reference or reference[k] != v}
    extras = ",".join(f"{k}={_yaml_value(v)}" for k, v in sorted(differs.items()))
    return f"{name}({extras})" if extras else name


def run_id(cfg: Config) -> str:
    """Readable, stable run folder name: the model, the norm's label (`norm_label`), batch size, seed and the
    config hash."""
    return f"{cfg.model.name}-{norm_label(to_dict(cfg)['norm'])}-b{cfg.batch_size}-s{cfg.seed}-{config_hash(cfg)}"


def legacy_run_id(cfg: Config, rid: str | None = None) -> str | None:
    """The run id normbench 0.2 gave this config, where it differs from `run_id` (`rid`, when known):
    before labels, a norm variant (gn8, bn_shared, gn with num_groups=4) was named by its norm's name
    alone. Finished runs under such an id are adopted (renamed), not trained again."""
    rid = rid or run_id(cfg)
    head, tail = f"{cfg.model.name}-", f"-b{cfg.batch_size}-s{cfg.seed}-"
    cut = rid.rfind(tail)
    if not rid.startswith(head) or cut < len(head) or rid[len(head):cut] == cfg.norm.name:
        return None
    return f"{head}{cfg.norm.name}{rid[cut:]}"
