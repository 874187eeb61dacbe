"""Loading the study configuration: YAML files merged in order, then checked
against workflow/schemas/config.schema.yaml, which also fills defaults."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from spinedet import SpinedetError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


def deep_merge(base: dict, override: dict) -> dict:
    """Merge `override` into a copy of `base`, recursing into dicts (as snakemake does)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load(paths: list[str | Path] | str | Path) -> dict:
    """Read and merge config files, validate them and fill schema defaults."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    config: dict = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise SpinedetError(f"config file not found: {path}")
        with path.open() as fh:
            config = deep_merge(config, yaml.safe_load(fh) or {})
    validate(config)
    return config


def validate(config: dict) -> None:
    """Validate in place against the schema (filling defaults); raise one clear error naming the key."""
    from spinedet.config_check import check_config

    check_config(config, SCHEMA_PATH)


NORMS = ("frozen_bn", "bn", "gn", "none")


def is_pretrained(model_cfg: dict) -> bool:
    return str(model_cfg.get("pretrained", "none")).lower() != "none"


def model_norm(model_cfg: dict) -> str:
    """A model's `norm`, or its default: from scratch gn; on pretrained weights
    torchvision's choice, frozen_bn for ResNet-50 and none for VGG-16 (whose
    classic ImageNet weights have no batch norm)."""
    norm = model_cfg.get("norm")
    if not norm:
        if not is_pretrained(model_cfg):
            norm = "gn"
        else:
            norm = "none" if str(model_cfg.get("arch", "")).startswith("fasterrcnn_vgg16") else "frozen_bn"
    if norm not in NORMS:
        raise SpinedetError(f"models.*.norm: {norm!r} is not one of {', '.join(NORMS)}")
    return norm
