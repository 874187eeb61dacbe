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


def load(sources: list[str | Path] | str | Path) -> dict:
    """Read and merge config sources in order, validate them and fill schema defaults.

    A source is a YAML file, or an inline YAML/JSON mapping (it starts with
    `{`): the workflow passes each verb exactly the config sections its rule
    depends on that way, as a rule param, so that a change to one of them
    reruns just those rules. Inline sources are the whole config of the call:
    top-level sections they do not hold are not filled from the schema, so a
    verb that reads a section its rule did not pass fails with a KeyError
    instead of silently running on a default.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    config: dict = {}
    for source in sources:
        config = deep_merge(config, read_source(source))
    given = set(config)
    validate(config)
    if sources and all(is_inline(source) for source in sources):
        config = {key: value for key, value in config.items() if key in given}
    return config


def add_config_argument(parser, required: bool = True) -> None:
    """Every verb's --config."""
    parser.add_argument("--config", nargs="+", required=required, default=None,
                        help="config YAML file(s) or inline YAML/JSON mapping(s), merged in order")


def is_inline(source: str | Path) -> bool:
    return isinstance(source, str) and source.lstrip().startswith("{")


def read_source(source: str | Path) -> dict:
    if is_inline(source):
        try:
            value = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            raise SpinedetError(f"inline config is not valid YAML/JSON: {exc}") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise SpinedetError(f"config file not found: {path}")
        with path.open() as fh:
            value = yaml.safe_load(fh)
    value = value or {}
    if not isinstance(value, dict):
        raise SpinedetError(f"config {source}: expected a mapping of keys, got {type(value).__name__}")
    return value


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


def study_models(config: dict) -> list[str]:
    """The models this study runs, in table order: `study.models`, else every entry of `models:`."""
    return list(config["study"]["models"] or config["models"])


def pseudonym_key_file(config: dict) -> str | None:
    """The pseudonym key a study uses: `deidentify.key_file`; with the demo, the synthetic
    export's own key (derived from demo.seed, so a fresh clone gets the same pseudonyms and
    split); else None, and deidentify creates restricted/pseudonym.key once. The workflow
    and a by-hand `spinedet deidentify` choose it here, so both give the same pseudonyms."""
    configured = config.get("deidentify", {}).get("key_file")
    if configured:
        return str(configured)
    demo = config.get("demo", {})
    if demo.get("enabled"):
        return f"{demo['out']}/pseudonym.key"
    return None


def finding_codes(config: dict) -> dict[str, tuple[str, str, str]]:
    """Each class's finding code (scheme, value, meaning) for the DICOM objects spinedet
    writes (the demo's SR and SEG): the first `code` entry of annotation_import.finding_map
    for the class, so that the annotation import reads them back as that class."""
    codes = {}
    for entry in config["annotation_import"]["finding_map"]:
        code = entry.get("code")
        if code and entry["class"] not in codes:
            codes[entry["class"]] = (code["scheme"], code["value"],
                                     code.get("meaning") or entry["class"].replace("_", " "))
    return codes
