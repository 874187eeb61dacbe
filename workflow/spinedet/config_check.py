"""Checking the study configuration.

`check_config` validates a merged config against
workflow/schemas/config.schema.yaml, fills the schema's defaults in place
(as snakemake's `validate(set_default=True)` does) and then runs the checks
JSON Schema cannot express. Every problem becomes one SpinedetError whose
message names the config key, e.g.
"config key 'split.fractions': train+val+test = 0.9, must sum to 1".
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from pathlib import Path

import jsonschema
import yaml
from jsonschema.exceptions import ValidationError, best_match

from spinedet import SpinedetError

# Feature maps each registered architecture gives the RPN: one anchor_sizes
# (and aspect_ratios) list per level.
FEATURE_LEVELS = {"fasterrcnn_resnet50_fpn": 5, "fasterrcnn_vgg16": 1, "fasterrcnn_vgg16_fpn": 4}

FRACTION_TOLERANCE = 1e-6

# What YAML 1.1 (PyYAML) reads as text although a person meant a number: 1e-4.
_NUMBER_AS_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def load_schema(schema_path: Path) -> dict:
    schema_path = Path(schema_path)
    if not schema_path.is_file():
        raise SpinedetError(f"config schema not found: {schema_path}")
    with schema_path.open() as fh:
        return yaml.safe_load(fh)


def known_architectures(schema: dict) -> list[str]:
    return list(schema["$defs"]["model"]["properties"]["arch"]["enum"])


def check_config(config: dict, schema_path: Path, *, check_paths: bool = False) -> dict:
    """Validate `config` in place, fill defaults, and return it.

    check_paths: also require the inputs of a real export (raw, annotations,
    cohort when demo.enabled is false) and a pretrained state_dict to exist,
    relative to the current directory. The Snakefile does this where the
    workflow starts; the verbs, which may run on compute nodes that cannot
    see the raw export, do not.
    """
    if not isinstance(config, dict):
        raise SpinedetError(f"config must be a mapping of keys to values, got {type(config).__name__}")
    schema = load_schema(schema_path)
    validator = _defaulting_validator_class(schema)(schema)
    error = best_match(validator.iter_errors(config))
    if error is not None:
        raise SpinedetError(format_schema_error(error, schema))
    check_semantics(config, known_architectures(schema), check_paths=check_paths)
    return config


def _defaulting_validator_class(schema: dict):
    """A validator class that fills `default`s of `properties` before checking them."""
    base = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validate_properties = base.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, subschema):
        if validator.is_type(instance, "object"):
            for name, property_schema in properties.items():
                if "default" in property_schema and name not in instance:
                    # A copy: the schema's default must never be shared with a config.
                    instance[name] = copy.deepcopy(property_schema["default"])
        yield from validate_properties(validator, properties, instance, subschema)

    return jsonschema.validators.extend(base, {"properties": properties_with_defaults})


def key_name(path: Iterable) -> str:
    """('models', 'vgg16', 'anchor_sizes', 0) -> 'models.vgg16.anchor_sizes[0]'."""
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or "<top level>"


def _child(parent: str, key: str) -> str:
    return key if parent == "<top level>" else f"{parent}.{key}"


_TYPE_WORDS = {"object": "mapping", "array": "list"}


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def format_schema_error(error: ValidationError, schema: dict) -> str:
    """One line naming the config key and what is wrong with it."""
    key = key_name(error.absolute_path)
    value = error.instance
    kind = error.validator

    if kind == "additionalProperties" and isinstance(value, dict):
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(value) - set(allowed))
        return (
            f"config key '{_child(key, unknown[0])}': unknown key (allowed here: "
            f"{', '.join(allowed)}); new keys must be added to the config schema"
        )
    if kind == "required" and isinstance(value, dict):
        missing = [name for name in error.validator_value if name not in value]
        return f"config key '{_child(key, missing[0])}': missing (required)"
    if kind == "enum":
        choices = ", ".join(map(str, error.validator_value))
        if error.validator_value == known_architectures(schema):
            return f"config key '{key}': unknown model architecture {value!r}; known architectures: {choices}"
        return f"config key '{key}': {value!r} is not one of {choices}"
    if kind == "type":
        expected = error.validator_value
        expected = [expected] if isinstance(expected, str) else expected
        expected = " or ".join(_TYPE_WORDS.get(name, name) for name in expected)
        got = "null" if value is None else f"{_json_type(value)} {value!r}"
        message = f"config key '{key}': expected {expected}, got {got}"
        if isinstance(value, str) and _NUMBER_AS_TEXT.match(value.strip()):
            message += " (YAML reads a number like 1e-4 as text: write 1.0e-4)"
        return message
    if kind == "not":
        description = error.schema.get("description")
        message = f"config key '{key}': {value!r} is not allowed"
        return f"{message} ({description})" if description else message
    if "propertyNames" in error.relative_schema_path:
        return (
            f"config key '{key}': name {value!r} is not allowed "
            "(letters, digits, '_' and '-', starting with a letter)"
        )
    return f"config key '{key}': {error.message}"


def check_semantics(config: dict, architectures: list[str], *, check_paths: bool = False) -> None:
    """The rules JSON Schema cannot express; `config` is schema-valid and complete."""
    _check_split(config["split"])
    _check_folders(config)
    _check_raw_format(config)
    _check_demo_paths(config)
    if check_paths:
        _check_inputs_exist(config)
    _check_patterns(config["inventory"])
    low, high = config["slices"]["window_percentiles"]
    if not low < high:
        raise SpinedetError(
            f"config key 'slices.window_percentiles': low {low} must be below high {high}"
        )
    for name, model in config["models"].items():
        _check_model(name, model, architectures, check_paths=check_paths)
    _check_study_models(config)
    _check_finding_map(config["annotation_import"]["finding_map"])
    _check_coco_import(config)


def _check_finding_map(finding_map: list[dict]) -> None:
    for index, entry in enumerate(finding_map):
        key = f"annotation_import.finding_map[{index}]"
        if ("code" in entry) == ("text" in entry):
            raise SpinedetError(f"config key '{key}': give either code: {{scheme, value}} or text: <regex>, "
                                "not both or neither")
        if "text" in entry:
            try:
                re.compile(entry["text"])
            except re.error as exc:
                raise SpinedetError(f"config key '{key}.text': not a valid regular expression "
                                    f"{entry['text']!r}: {exc}") from None


def _check_coco_import(config: dict) -> None:
    """A COCO file needs its export's manifest, and a copy of it: the annotations rule
    cannot read annotation_export's own output, which comes after slices."""
    settings = config["annotation_import"]
    if settings["coco"] is None:
        return
    manifest = settings["coco_manifest"]
    if manifest is None:
        raise SpinedetError("config key 'annotation_import.coco_manifest': missing; with annotation_import.coco "
                            "set, give the manifest.csv of the export its images came from (a copy, e.g. "
                            "restricted/labels/manifest.csv)")
    if _same_path(manifest, Path(config["restricted"]) / "annotation_export" / "manifest.csv"):
        raise SpinedetError(f"config key 'annotation_import.coco_manifest': {manifest} is what rule "
                            "annotation_export writes, after the annotations rule has run; copy it beside the COCO "
                            "file (e.g. restricted/labels/manifest.csv) and point coco_manifest at the copy")


def _check_study_models(config: dict) -> None:
    chosen = config["study"]["models"] or []
    unknown = [name for name in chosen if name not in config["models"]]
    if unknown:
        raise SpinedetError(
            f"config key 'study.models': {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not an "
            f"entry of models: (the entries are {', '.join(config['models'])})"
        )


def _check_split(split: dict) -> None:
    fractions = split["fractions"]
    total = sum(fractions[part] for part in ("train", "val", "test"))
    if not math.isclose(total, 1.0, rel_tol=0.0, abs_tol=FRACTION_TOLERANCE):
        raise SpinedetError(
            f"config key 'split.fractions': train+val+test = {total:.6g}, must sum to 1"
        )


def _check_folders(config: dict) -> None:
    results = Path(config["results"]).resolve()
    restricted = Path(config["restricted"]).resolve()
    if restricted.is_relative_to(results):
        raise SpinedetError(
            f"config key 'restricted': {config['restricted']} lies inside results "
            f"({config['results']}); identifying data must stay outside results/"
        )


def _same_path(a: str, b: Path) -> bool:
    return Path(a).resolve() == b.resolve()


def _check_demo_paths(config: dict) -> None:
    """With the demo on, raw/annotations/cohort must be what the synthesizer writes."""
    if not config["demo"]["enabled"]:
        return
    out = Path(config["demo"]["out"])
    bids = config["demo"]["export_format"] == "bids"
    if bids != (config["raw_format"] == "bids"):
        raise SpinedetError(f"config key 'raw_format': demo.export_format {config['demo']['export_format']} "
                            f"needs raw_format {config['demo']['export_format']}, got {config['raw_format']}")
    expected = {"raw": out / ("BIDS" if bids else "DICOM"), "annotations": out / "annotations.csv",
                "cohort": out / "cohort.csv"}
    for key, path in expected.items():
        if key in ("annotations", "cohort") and config[key] is None:
            continue  # the demo's SR and SEG objects alone; a BIDS demo's participants.tsv
        if not _same_path(config[key], path):
            raise SpinedetError(
                f"config key '{key}': with demo.enabled the synthesizer writes {path}, "
                f"but {key} is {config[key]}; point {key} there or set demo.enabled: false"
            )


def _check_raw_format(config: dict) -> None:
    """A BIDS dataset brings its boxes as masks and may bring its cohort as participants.tsv."""
    if config["raw_format"] == "bids":
        if config["annotations"] is not None:
            raise SpinedetError("config key 'annotations': with raw_format bids the boxes come from the label "
                                "masks under bids.derivatives; set annotations: null")
    elif config["cohort"] is None:
        raise SpinedetError("config key 'cohort': a DICOM export needs a cohort sheet (null is for raw_format "
                            "bids, whose participants.tsv holds the groups)")


def _check_inputs_exist(config: dict) -> None:
    if config["demo"]["enabled"]:
        return
    raw = Path(config["raw"])
    if not raw.is_dir():
        raise SpinedetError(
            f"config key 'raw': folder not found: {raw} (demo.enabled is false, "
            f"so the raw {'BIDS dataset' if config['raw_format'] == 'bids' else 'DICOM export'} must exist)"
        )
    for key in ("annotations", "cohort"):
        if config[key] is None:  # annotations: null, the export's SR and SEG objects alone
            continue
        path = Path(config[key])
        if not path.is_file():
            raise SpinedetError(
                f"config key '{key}': file not found: {path} (demo.enabled is false, "
                f"so the {key} sheet must exist)"
            )


def _check_patterns(inventory: dict) -> None:
    for key in ("description_pattern", "exclude_pattern"):
        pattern = inventory[key]
        if pattern is None:
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SpinedetError(
                f"config key 'inventory.{key}': not a valid regular expression {pattern!r}: {exc}"
            ) from None


def _check_model(name: str, model: dict, architectures: list[str], *, check_paths: bool) -> None:
    key = f"models.{name}"
    arch = model["arch"]
    if arch not in architectures:  # the schema enum already says so; kept for plain-dict callers
        raise SpinedetError(
            f"config key '{key}.arch': unknown model architecture {arch!r}; "
            f"known architectures: {', '.join(architectures)}"
        )
    levels = FEATURE_LEVELS.get(arch)
    if levels is not None and len(model["anchor_sizes"]) != levels:
        raise SpinedetError(
            f"config key '{key}.anchor_sizes': {arch} has {levels} feature level(s), "
            f"so it needs {levels} list(s) of sizes, got {len(model['anchor_sizes'])}"
        )
    if len(model["aspect_ratios"]) != len(model["anchor_sizes"]):
        raise SpinedetError(
            f"config key '{key}.aspect_ratios': one list per feature level is needed "
            f"({len(model['anchor_sizes'])}, as in anchor_sizes), got {len(model['aspect_ratios'])}"
        )
    steps = model.get("lr_steps") or []
    if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
        raise SpinedetError(f"config key '{key}.lr_steps': {steps} must be strictly increasing")
    pretrained = model["pretrained"]
    if check_paths and pretrained not in ("none", "imagenet") and not Path(pretrained).is_file():
        raise SpinedetError(
            f"config key '{key}.pretrained': file not found: {pretrained} "
            "(use none, imagenet or the path of a state_dict)"
        )
