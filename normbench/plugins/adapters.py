"""A plugin's builder wrapped to the contract normbench's own entries have, with its mistakes named.

norm:    build(num_features, kind, options) -> nn.Module; kind is flat (N, C), spatial (N, C, H, W) or
         recurrent (one step (N, C) of a cell; statistics per step are the norm's own business).
model:   build(options, input_shape, num_classes, norm) -> nn.Module mapping (N, *input_shape) to
         (N, num_classes) logits; `norm` is the NormFactory every built-in model gets.
dataset: build(options, root) -> normbench.data.RawData (uint8 images (N, C, H, W), int64 labels).
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.data import RawData, data_root
from normbench.errors import UserError
from normbench.norms.spec import NormSpec
from normbench.plugins.entries import Entry


def _who(e: Entry) -> str:
    return f"{'dataset' if e.group == 'data' else e.group} '{e.name}' (plugin {e.provenance.plugin})"


def norm_spec(e: Entry, centers: bool = True, activation: bool = False) -> NormSpec:
    def build(num_features: int, kind: str, options, steps: int | None) -> nn.Module:
        if kind not in e.kinds:
            raise UserError(f"{_who(e)} is undefined on {kind} features: it takes {', '.join(e.kinds)}")
        extra = getattr(options, "extra", None)
        layer = e.build(num_features, kind, extra if extra is not None else e.options_of(None))
        if not isinstance(layer, nn.Module):
            raise UserError(f"{_who(e)}: its builder returned {type(layer).__name__}, not a torch.nn.Module")
        layer._normbench_norm = True  # `is_norm`: its parameters are norm parameters (norm_weight_decay, probes)
        return layer

    return NormSpec(build, centers=centers, activation=activation)


def model_builder(e: Entry):
    def build(cfg, input_shape: tuple[int, ...], num_classes: int, norm) -> nn.Module:
        model = e.build(e.options_of(cfg), input_shape, num_classes, norm)
        if not isinstance(model, nn.Module):
            raise UserError(f"{_who(e)}: its builder returned {type(model).__name__}, not a torch.nn.Module")
        return model

    return build


def dataset_builder(e: Entry):
    def build(cfg) -> RawData:
        raw = e.build(e.options_of(cfg), data_root(cfg.root))
        if not isinstance(raw, RawData):
            raise UserError(f"{_who(e)}: its builder returned {type(raw).__name__}, not normbench.data.RawData")
        for split in ("train", "test"):
            x, y = getattr(raw, f"{split}_x"), getattr(raw, f"{split}_y")
            if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4):
                raise UserError(f"{_who(e)}: {split}_x must be a uint8 tensor (N, C, H, W)")
            if not (isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.shape == (len(x),)):
                raise UserError(f"{_who(e)}: {split}_y must be an int64 tensor of {len(x)} labels")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= raw.num_classes):
                raise UserError(f"{_who(e)}: {split}_y holds labels outside [0, {raw.num_classes})")
        return raw

    return build
