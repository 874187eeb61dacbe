"""The config schema, spinedet.config_check and the Snakefile's config check."""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spinedet import SpinedetError
from spinedet.config import SCHEMA_PATH, deep_merge, load
from spinedet.config_check import FEATURE_LEVELS, check_config, known_architectures, load_schema

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def study_config() -> dict:
    with (REPO / "config.yaml").open() as fh:
        return yaml.safe_load(fh)


def smoke_config() -> dict:
    with (REPO / "config" / "smoke.yaml").open() as fh:
        return deep_merge(study_config(), yaml.safe_load(fh))


def checked(override: dict, base: dict | None = None) -> dict:
    """check_config as the Snakefile runs it where the workflow starts (paths checked)."""
    config = deep_merge(study_config() if base is None else base, override)
    return check_config(config, SCHEMA_PATH, check_paths=True)


def error_of(override: dict) -> str:
    with pytest.raises(SpinedetError) as info:
        checked(override)
    return str(info.value)


def schema_properties(node: dict, schema: dict):
    """Yield (dotted key, property schema) for every named property, following $refs."""
    stack = [("", node)]
    while stack:
        prefix, current = stack.pop()
        if "$ref" in current:
            current = {**schema["$defs"][current["$ref"].split("/")[-1]], **current}
        for name, prop in current.get("properties", {}).items():
            key = f"{prefix}.{name}" if prefix else name
            yield key, prop
            stack.append((key, prop))
        extra = current.get("additionalProperties")
        if isinstance(extra, dict):
            stack.append((f"{prefix}.*", extra))


# --- defaults and descriptions -------------------------------------------------------------


def test_config_yaml_and_smoke_are_valid():
    assert checked({})["split"]["fractions"] == {"train": 0.67, "val": 0.08, "test": 0.25}
    smoke = check_config(smoke_config(), SCHEMA_PATH)
    assert smoke["demo"]["patients"] == 10


def test_schema_defaults_reproduce_config_yaml():
    from_defaults = check_config({}, SCHEMA_PATH)
    assert from_defaults == checked({})


# Keys of config.yaml without a plain schema default, and why.
NO_PLAIN_DEFAULT = {
    "models.*.arch": "required",
    "models.*.anchor_sizes": "default depends on arch",
    "models.*.aspect_ratios": "default depends on arch",
    "models.*.norm": "default depends on pretrained and arch (gn from scratch, torchvision's choice with weights)",
    "split.fractions.train": "split.fractions has a default as a whole",
    "split.fractions.val": "split.fractions has a default as a whole",
    "split.fractions.test": "split.fractions has a default as a whole",
}
# Optional keys whose absence means "the library's own value".
OPTIONAL_PREFIXES = ("models.*.detector_kwargs.",)


def config_keys(value, prefix=""):
    """Dotted keys of a config; model names become '*'."""
    for name, child in value.items():
        key = f"{prefix}.{name}" if prefix else name
        yield key
        if isinstance(child, dict):
            child_prefix = key
            if key == "models":
                for model in child.values():
                    yield from config_keys(model, "models.*")
                continue
            if key == "bids.label_map":  # a mapping of the user's label names
                continue
            yield from config_keys(child, child_prefix)


def test_every_key_of_config_yaml_is_described_and_has_a_default():
    schema = load_schema(SCHEMA_PATH)
    described = dict(schema_properties(schema, schema))
    for key in set(config_keys(study_config())):
        assert key in described, f"{key} is not in the schema"
        assert described[key].get("description"), f"{key} has no description"
        if key not in NO_PLAIN_DEFAULT and not key.startswith(OPTIONAL_PREFIXES):
            assert "default" in described[key], f"{key} has no default"


def test_defaults_fill_a_partial_model_entry_by_architecture():
    config = checked({"models": {"tiny": {"arch": "fasterrcnn_vgg16"}, "fpn": {"arch": "fasterrcnn_resnet50_fpn"},
                                 "vggfpn": {"arch": "fasterrcnn_vgg16_fpn"}}})
    tiny, fpn, vggfpn = config["models"]["tiny"], config["models"]["fpn"], config["models"]["vggfpn"]
    assert tiny["anchor_sizes"] == [[8, 16, 32, 64]]
    assert tiny["aspect_ratios"] == [[0.5, 1.0, 2.0]]
    assert len(fpn["anchor_sizes"]) == len(fpn["aspect_ratios"]) == 5
    assert vggfpn["anchor_sizes"] == [[8], [16], [32], [64]] and len(vggfpn["aspect_ratios"]) == 4
    assert tiny["hflip"] is False
    assert tiny["max_iters_per_epoch"] is None
    assert tiny["scheduler"] == "cosine"
    assert "lr_steps" not in tiny


def test_smoke_override_keeps_study_values_and_fills_the_rest():
    smoke = check_config(smoke_config(), SCHEMA_PATH)
    vgg = smoke["models"]["vgg16"]
    assert vgg["max_iters_per_epoch"] == 3
    assert vgg["momentum"] == 0.9  # from config.yaml, not overridden by smoke
    assert vgg["aspect_ratios"] == [[0.5, 1.0, 2.0, 3.0]] * 4  # from config.yaml
    assert check_config({"models": {"v": {"arch": "fasterrcnn_vgg16"}}}, SCHEMA_PATH)["models"]["v"][
        "aspect_ratios"] == [[0.5, 1.0, 2.0]]  # from the schema


def test_defaults_are_copies_not_shared_between_configs():
    first = check_config({}, SCHEMA_PATH)
    first["classes"].append("fracture")
    first["models"]["vgg16"]["anchor_sizes"][0].append(512)
    second = check_config({}, SCHEMA_PATH)
    assert second["classes"] == ["disc_herniation", "cord_injury"]
    assert second["models"]["vgg16"]["anchor_sizes"] == [[8], [16], [32], [64]]


def test_checking_twice_changes_nothing():
    once = checked({})
    twice = check_config(copy.deepcopy(once), SCHEMA_PATH)
    assert twice == once


def test_load_merges_files_in_order(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("seed: 5\nsplit:\n  folds: 3\n")
    config = load([REPO / "config.yaml", override])
    assert config["seed"] == 5
    assert config["split"] == {"fractions": {"train": 0.67, "val": 0.08, "test": 0.25}, "folds": 3}


def test_architecture_enum_matches_the_model_registry():
    from spinedet.detect.models import ARCHITECTURES

    schema_archs = sorted(known_architectures(load_schema(SCHEMA_PATH)))
    assert schema_archs == sorted(ARCHITECTURES) == sorted(FEATURE_LEVELS)


# --- one clear error per problem -----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"models": {"resnet50": {"epochs": "ten"}}}, "config key 'models.resnet50.epochs': expected integer, got string 'ten'"),
        ({"models": {"vgg16": {"lr": "1e-3"}}}, "write 1.0e-4"),
        ({"demo": {"enabled": "yes"}}, "config key 'demo.enabled': expected boolean"),
        ({"split": 5}, "config key 'split': expected mapping, got number 5"),
        (
            {"models": {"resnet50": {"arch": "yolo"}}},
            "config key 'models.resnet50.arch': unknown model architecture 'yolo'; "
            "known architectures: fasterrcnn_resnet50_fpn, fasterrcnn_vgg16, fasterrcnn_vgg16_fpn",
        ),
        ({"split": {"fractions": {"train": 0.6, "val": 0.1, "test": 0.2}}}, "config key 'split.fractions': train+val+test = 0.9, must sum to 1"),
        ({"split": {"fractions": {"train": 0.7, "val": 0.2, "test": 0.2}}}, "train+val+test = 1.1, must sum to 1"),
        ({"split": {"fraction": {}}}, "config key 'split.fraction': unknown key (allowed here: folds, fractions)"),
        ({"split": {"folds": 1}}, "config key 'split.folds': 1 is not allowed"),
        ({"sed": 1}, "config key 'sed': unknown key"),
        ({"train": {"device": "gpu"}}, "config key 'train.device': 'gpu' is not one of auto, cpu, cuda"),
        ({"speed": {"iterations": 0}}, "config key 'speed.iterations': 0 is less than the minimum of 1"),
        ({"models": {"my model": {"arch": "fasterrcnn_vgg16"}}}, "config key 'models': name 'my model' is not allowed"),
        ({"models": {"extra": {"lr": 0.1}}}, "config key 'models.extra.arch': missing (required)"),
        ({"models": {"vgg16": {"anchor_sizes": [[16], [32]]}}}, "config key 'models.vgg16.anchor_sizes': fasterrcnn_vgg16_fpn has 4 feature level(s)"),
        ({"models": {"vgg16": {"aspect_ratios": [[1.0], [2.0]]}}}, "config key 'models.vgg16.aspect_ratios': one list per feature level"),
        ({"models": {"vgg16": {"scheduler": "multistep", "lr_steps": [4, 2]}}}, "config key 'models.vgg16.lr_steps': [4, 2] must be strictly increasing"),
        ({"models": {"vgg16": {"pretrained": "weights/missing.pth"}}}, "config key 'models.vgg16.pretrained': file not found: weights/missing.pth"),
        ({"restricted": "results/phi"}, "config key 'restricted': results/phi lies inside results"),
        ({"inventory": {"exclude_pattern": "(loc"}}, "config key 'inventory.exclude_pattern': not a valid regular expression"),
        ({"slices": {"window_percentiles": [99.0, 1.0]}}, "config key 'slices.window_percentiles': low 99.0 must be below high 1.0"),
        ({"resources": {"train": {"gpu_model": "a100 80gb"}}}, "config key 'resources.train.gpu_model'"),
        ({"models": {"vgg16": {"detector_kwargs": {"rpn_post_nms_top_n": 300}}}}, "config key 'models.vgg16.detector_kwargs.rpn_post_nms_top_n': unknown key"),
        ({"study": {"models": ["resnet50", "vgg19"]}}, "config key 'study.models': vgg19 is not an entry of models: (the entries are resnet50, vgg16)"),
        ({"study": {"models": []}}, "config key 'study.models'"),
        ({"raw": "elsewhere/DICOM"}, "config key 'raw': with demo.enabled the synthesizer writes resources/demo_export/DICOM"),
        ({"annotation_import": {"coco": "restricted/labels/coco.json"}}, "config key 'annotation_import.coco_manifest': missing"),
        ({"annotation_import": {"coco": "restricted/labels/coco.json", "coco_manifest": "restricted/annotation_export/manifest.csv"}},
         "config key 'annotation_import.coco_manifest': restricted/annotation_export/manifest.csv is what rule annotation_export writes"),
    ],
)
def test_each_problem_is_one_line_naming_the_key(override, expected):
    message = error_of(override)
    assert expected in message
    assert "\n" not in message


def test_multistep_without_lr_steps_is_left_to_the_trainer():
    config = checked({"models": {"vgg16": {"scheduler": "multistep"}}})
    assert "lr_steps" not in config["models"]["vgg16"]


def test_fractions_within_tolerance_pass():
    config = checked({"split": {"fractions": {"train": 0.7 + 5e-7, "val": 0.1, "test": 0.2}}})
    assert config["split"]["fractions"]["train"] > 0.7


def real_export(tmp_path: Path) -> dict:
    raw = tmp_path / "export" / "DICOM"
    raw.mkdir(parents=True)
    (tmp_path / "export" / "annotations.csv").write_text("study_uid\n")
    (tmp_path / "export" / "cohort.csv").write_text("patient_id,group\n")
    return {
        "demo": {"enabled": False},
        "raw": str(raw),
        "annotations": str(tmp_path / "export" / "annotations.csv"),
        "cohort": str(tmp_path / "export" / "cohort.csv"),
    }


def test_real_export_that_exists_passes(tmp_path):
    config = checked(real_export(tmp_path))
    assert config["demo"]["enabled"] is False


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        ("raw", "config key 'raw': folder not found"),
        ("annotations", "config key 'annotations': file not found"),
        ("cohort", "config key 'cohort': file not found"),
    ],
)
def test_real_export_with_a_missing_input_fails(tmp_path, missing, expected):
    override = real_export(tmp_path)
    override[missing] = str(tmp_path / "nowhere")
    message = error_of(override)
    assert message.startswith(expected)
    assert "demo.enabled is false" in message


def test_verbs_do_not_check_paths_by_default(tmp_path):
    # What spinedet.config.load does: compute nodes need not see the raw export.
    override = {"demo": {"enabled": False}, "raw": str(tmp_path / "nowhere"),
                "models": {"vgg16": {"pretrained": str(tmp_path / "weights.pth")}}}
    config = check_config(deep_merge(study_config(), override), SCHEMA_PATH)
    assert config["raw"].endswith("nowhere")


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    real_export(tmp_path)
    monkeypatch.chdir(tmp_path)
    config = checked(
        {"demo": {"enabled": False}, "raw": "export/DICOM", "annotations": "export/annotations.csv", "cohort": "export/cohort.csv"}
    )
    assert config["raw"] == "export/DICOM"


# --- the same messages from the workflow ---------------------------------------------------


def snakemake_dry_run(tmp_path: Path, override: dict, *args: str) -> subprocess.CompletedProcess:
    extra = tmp_path / "override.yaml"
    extra.write_text(yaml.safe_dump(override))
    return subprocess.run(
        [str(SNAKEMAKE), "-n", *args, "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config.yaml"), str(extra)],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"models": {"resnet50": {"epochs": "ten"}}}, "config key 'models.resnet50.epochs': expected integer, got string 'ten'"),
        ({"models": {"vgg16": {"arch": "vgg19"}}}, "config key 'models.vgg16.arch': unknown model architecture 'vgg19'; known architectures: fasterrcnn_resnet50_fpn, fasterrcnn_vgg16, fasterrcnn_vgg16_fpn"),
        ({"split": {"fractions": {"train": 0.6, "val": 0.1, "test": 0.2}}}, "config key 'split.fractions': train+val+test = 0.9, must sum to 1"),
        ({"demo": {"enabled": False}, "raw": "no/such/export"}, "config key 'raw': folder not found: no/such/export"),
    ],
)
def test_snakemake_reports_the_same_one_line_message(tmp_path, override, expected):
    result = snakemake_dry_run(tmp_path, override)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert expected in output
    assert "Traceback" not in output


def inline_config(command: str) -> dict:
    """The inline --config mapping of one printed shell command."""
    return yaml.safe_load(shlex.split(command)[shlex.split(command).index("--config") + 1])


def test_each_verb_gets_exactly_its_config_sections_and_parsing_writes_nothing(tmp_path):
    with (REPO / "config" / "smoke.yaml").open() as fh:
        result = snakemake_dry_run(tmp_path, yaml.safe_load(fh), "-p")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snakemake", "override.yaml"]
    commands = {}
    for line in result.stdout.splitlines():
        if line.startswith("Shell command: spinedet "):
            line = line.removeprefix("Shell command: ")
            words = shlex.split(line)
            key = words[1] + (f"[{words[words.index('--model') + 1]}]" if "--model" in words else "")
            commands[key] = inline_config(line)
    assert {name: sorted(config) for name, config in commands.items()} == {
        "synthesize": ["annotation_import", "classes", "groups"],
        "inventory": ["groups", "inventory"],
        "annotations": ["annotation_import", "classes"],
        "convert": [],
        "deidentify": ["classes", "deidentify"],
        "slices": ["classes", "slices"],
        "split": ["classes", "groups", "seed", "split"],
        "train[resnet50]": ["classes", "models", "seed", "train"],
        "train[vgg16]": ["classes", "models", "seed", "train"],
        "evaluate[resnet50]": ["classes", "evaluate", "models", "seed", "train"],
        "evaluate[vgg16]": ["classes", "evaluate", "models", "seed", "train"],
        "speed": ["evaluate", "models", "speed", "train"],
        "compare": ["classes", "compare", "evaluate", "seed"],
        "report": sorted(set(load([REPO / "config.yaml"])) - {"resources"}),
    }
    resnet50 = commands["train[resnet50]"]["models"]
    assert list(resnet50) == ["resnet50"]  # a change to vgg16's recipe does not rerun it
    assert resnet50["resnet50"]["aspect_ratios"] == [[0.5, 1.0, 2.0, 3.0]] * 5  # schema-filled
    assert resnet50["resnet50"]["max_iters_per_epoch"] == 3  # from the smoke override


def test_an_inline_config_holds_only_its_sections_defaults_filled(tmp_path):
    config = load(['{"slices": {"half_width": 1}, "classes": ["a", "b"]}'])
    assert sorted(config) == ["classes", "slices"]
    assert config["slices"]["half_width"] == 1 and config["slices"]["mode"] == "mid"  # default filled
    with pytest.raises(KeyError):
        config["seed"]  # a section the rule did not pass is not silently defaulted
    from_file = load([REPO / "config.yaml"])
    assert "seed" in from_file and "resources" in from_file  # a file: the whole study config
    with pytest.raises(SpinedetError, match="inline config is not valid YAML/JSON"):
        load(['{"slices": [}'])


def test_the_demo_passes_its_export_key_to_deidentify_and_real_data_does_not(tmp_path):
    def deidentify_command(override: dict) -> str:
        extra = tmp_path / "override.yaml"
        extra.write_text(yaml.safe_dump(override))
        result = subprocess.run(
            [str(SNAKEMAKE), "-n", "-p", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
             "--configfile", str(REPO / "config.yaml"), str(extra), "--", "results/deid"],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert result.returncode == 0, result.stderr
        return next(line for line in result.stdout.splitlines() if "spinedet deidentify" in line)

    demo = deidentify_command({})
    assert "--key-file resources/demo_export/pseudonym.key" in demo
    raw = tmp_path / "export"
    (raw / "DICOM").mkdir(parents=True)
    (raw / "annotations.csv").write_text("study_uid,series_uid,sop_instance_uid,instance_number,label,x_min,y_min,x_max,y_max\n")
    (raw / "cohort.csv").write_text("patient_id,group\n")
    real = deidentify_command({"demo": {"enabled": False}, "raw": str(raw / "DICOM"),
                               "annotations": str(raw / "annotations.csv"), "cohort": str(raw / "cohort.csv")})
    assert "--key-file" not in real


def test_study_models_runs_one_model_through_every_rule(tmp_path):
    """An override cannot remove an entry of models:, study.models can: one model is trained,
    evaluated, timed, compared (with nothing to pair) and reported."""
    with (REPO / "config" / "smoke.yaml").open() as fh:
        smoke = yaml.safe_load(fh)
    result = snakemake_dry_run(tmp_path, {**smoke, "study": {"models": ["vgg16"]}}, "-p")
    assert result.returncode == 0, result.stderr
    commands = [line.removeprefix("Shell command: ") for line in result.stdout.splitlines()
                if line.startswith("Shell command: spinedet ")]
    verbs = [shlex.split(line)[1] for line in commands]
    assert verbs.count("train") == 1 and verbs.count("evaluate") == 1
    for line in commands:
        words = shlex.split(line)
        assert "resnet50" not in words, line
        if words[1] in ("train", "evaluate"):
            assert words[words.index("--model") + 1] == "vgg16"
        if words[1] in ("speed", "compare", "report"):
            assert words[words.index("--models") + 1:words.index("--models") + 3][0] == "vgg16"
            assert words[words.index("--models") + 2].startswith("--")


def test_study_models_defaults_to_every_model_in_order():
    from spinedet.config import study_models

    assert study_models(checked({})) == ["resnet50", "vgg16"]
    assert study_models(checked({"study": {"models": ["vgg16", "resnet50"]}})) == ["vgg16", "resnet50"]


def test_deidentify_by_hand_uses_the_key_the_workflow_uses(tmp_path):
    from spinedet.config import pseudonym_key_file

    assert pseudonym_key_file(checked({})) == "resources/demo_export/pseudonym.key"
    assert pseudonym_key_file(checked({"deidentify": {"key_file": "keys/site.key"}})) == "keys/site.key"
    assert pseudonym_key_file(checked(real_export(tmp_path))) is None


def test_the_real_study_override_marks_what_to_set_and_dry_runs_on_a_real_export(tmp_path):
    """config/real-study.yaml: the keys a user must set are marked SET, unedited it stops on
    the first placeholder path, and with real paths the DAG has no demo and the real recipe."""
    real_study = REPO / "config" / "real-study.yaml"
    to_set = {line.split(":")[0].strip() for line in real_study.read_text().splitlines() if "# SET" in line}
    assert to_set == {"enabled", "raw", "annotations", "cohort"}
    with pytest.raises(SpinedetError, match="config key 'raw': folder not found: /path/to/export/DICOM"):
        check_config(deep_merge(load([REPO / "config.yaml"]), yaml.safe_load(real_study.read_text())),
                     SCHEMA_PATH, check_paths=True)

    paths = tmp_path / "paths.yaml"
    paths.write_text(yaml.safe_dump({key: value for key, value in real_export(tmp_path).items() if key != "demo"}))
    result = subprocess.run(
        [str(SNAKEMAKE), "-n", "-p", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config.yaml"), str(real_study), str(paths)],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "synthesize" not in result.stdout and "localrules directive" not in result.stdout + result.stderr
    train = next(line.removeprefix("Shell command: ") for line in result.stdout.splitlines()
                 if line.startswith("Shell command: spinedet train") and "--model resnet50" in line)
    recipe = inline_config(train)["models"]["resnet50"]
    assert recipe["pretrained"] == "imagenet" and recipe["crop_size"] is None and recipe["lr"] == 0.005
    assert recipe["anchor_sizes"][0] == [16] and recipe["sampler"] == "uniform"


def test_raw_format_bids_takes_its_boxes_from_masks_and_may_take_its_cohort_from_participants():
    bids_demo = {"raw_format": "bids", "raw": "resources/demo_export/BIDS", "annotations": None, "cohort": None,
                 "demo": {"export_format": "bids"}}
    assert checked(bids_demo)["bids"]["suffix"] == "T2w"
    assert "set annotations: null" in error_of({**bids_demo, "annotations": "resources/demo_export/annotations.csv"})
    assert "needs raw_format bids" in error_of({**bids_demo, "raw_format": "dicom", "cohort": "x.csv"})
    assert "with demo.enabled the synthesizer writes resources/demo_export/BIDS" in error_of(
        {**bids_demo, "raw": "resources/demo_export/DICOM"})
    assert "a DICOM export needs a cohort sheet" in error_of({"cohort": None})
    assert "config key 'bids.suffix'" in error_of({**bids_demo, "bids": {"suffix": "T2w.nii"}})
    assert "BIDS dataset must exist" in str(pytest.raises(SpinedetError, check_config, {
        **study_config(), **bids_demo, "raw": "/no/such/bids", "demo": {"enabled": False}}, SCHEMA_PATH,
        check_paths=True).value)


def test_the_bids_smoke_override_is_a_valid_study():
    with (REPO / "config" / "smoke-bids.yaml").open() as fh:
        bids = yaml.safe_load(fh)
    config = checked(bids, deep_merge(study_config(), smoke_config()))
    assert config["raw_format"] == "bids" and config["demo"]["export_format"] == "bids"
