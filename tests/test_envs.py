"""The conda environments of the rules (envs/*.yaml) against the tested .venv:
every rule's env exists, pins what the venv has, and provides what its verb imports."""

from __future__ import annotations

import ast
import importlib.metadata
import platform
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

ENVS = REPO / "envs"
# conda-forge package of each import name / distribution, where the names differ.
CONDA_NAME = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "torch": "pytorch",
              "matplotlib": "matplotlib-base"}
DISTRIBUTION = {"pytorch": "torch", "matplotlib-base": "matplotlib"}


def env_pins(env_file: Path) -> dict[str, str | None]:
    """conda package -> pinned version (None when unpinned) of an env file."""
    pins = {}
    for spec in yaml.safe_load(env_file.read_text())["dependencies"]:
        assert isinstance(spec, str), f"{env_file.name}: a pip section cannot install spinedet (see post-deploy)"
        name, _, version = spec.partition("==")
        pins[name] = version or None
    return pins


def rule_envs_and_verbs() -> dict[str, tuple[str, str]]:
    """rule -> (env name, spinedet verb), read from workflow/rules/*.smk."""
    found = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"\n\s*(?=(?:rule|checkpoint) \w+:)", smk.read_text()):
            header = re.match(r"\s*(?:rule|checkpoint) (\w+):", block)
            env = re.search(r'conda:\s*"\.\./\.\./envs/(\w+)\.yaml"', block)
            verb = re.search(r'"spinedet ([\w-]+)', block)
            if header and env and verb:
                found[header.group(1)] = (env.group(1), verb.group(1))
    return found


def module_source(module: str) -> Path | None:
    """The source file of a dotted spinedet module (spinedet.study.report), package or module."""
    base = REPO / "workflow" / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def third_party_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """Top-level third-party imports of a spinedet module (dotted) and the spinedet modules it imports."""
    seen = set() if seen is None else seen
    source = module_source(module)
    if module in seen or source is None:
        return set()
    seen.add(module)
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "spinedet":
                found |= third_party_imports(name, seen)
            elif parts[0] not in sys.stdlib_module_names:
                found.add(parts[0])
    return found


def test_the_import_walk_follows_the_wings():
    assert module_source("spinedet.study.report") == REPO / "workflow" / "spinedet" / "study" / "report.py"
    assert {"jinja2", "matplotlib", "yaml"} <= third_party_imports("spinedet.study.report")
    assert "torch" in third_party_imports("spinedet.study.evaluate")  # through spinedet.detect.engine


def test_every_rule_env_exists_with_its_post_deploy_script():
    rules = rule_envs_and_verbs()
    assert {"synthesize", "inventory", "convert", "deidentify", "slices", "split", "train", "evaluate", "report"} <= set(rules)
    for env, _ in rules.values():
        assert (ENVS / f"{env}.yaml").is_file()
        assert "pip install --quiet --no-deps" in (ENVS / f"{env}.post-deploy.sh").read_text()


def test_env_pins_equal_the_tested_venv():
    for env_file in sorted(ENVS.glob("*.yaml")):
        for name, version in env_pins(env_file).items():
            if name == "python":
                assert version == platform.python_version(), env_file.name
            elif version is not None:
                installed = importlib.metadata.version(DISTRIBUTION.get(name, name))
                assert version == installed, f"{env_file.name}: {name}=={version}, .venv has {installed}"


def test_each_rule_env_provides_what_its_verb_imports():
    missing = {}
    for rule, (env, verb) in rule_envs_and_verbs().items():
        pins = env_pins(ENVS / f"{env}.yaml")
        from spinedet.cli import stage_module

        needed = {CONDA_NAME.get(name, name)
                  for name in third_party_imports(stage_module(verb)) | third_party_imports("spinedet.cli")}
        if needed - set(pins):
            missing[f"{rule} ({env}.yaml)"] = sorted(needed - set(pins))
    assert missing == {}
