"""The docs say what the code does: the README's commands run as printed (their
dry-run form), every config key a doc names is one of the schema's and every
schema key is described, and every reason code the code can write is in the
README's "When things go wrong" table."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = {path.relative_to(REPO).as_posix(): path.read_text()
        for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
PACKAGE = REPO / "workflow" / "spinedet"
SHELL_COMMAND = re.compile(r"^(snakemake|make|spinedet|source)\b")
FILE_SUFFIXES = {"csv", "json", "yaml", "html", "md", "png", "pt", "gz", "nii", "py", "smk", "tsv", "key", "sh",
                 "txt", "dcm", "log"}


# ---------------------------------------------------------------- commands


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks (comments and continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_the_readme_shows_commands_a_user_can_run():
    commands = readme_commands()
    assert all(SHELL_COMMAND.match(command) for command in commands), \
        [c for c in commands if not SHELL_COMMAND.match(c)]
    assert "make demo" in commands and "make test" in commands and "make install" in commands
    assert "source .venv/bin/activate" in commands
    # no placeholders in brackets: a command is printed the way it is run
    assert not [c for c in commands if re.search(r"\[--?\w", c)]


def test_every_make_target_the_readme_names_exists():
    for command in readme_commands():
        if command.startswith("make "):
            dry = subprocess.run(["make", "-n", *shlex.split(command)[1:]], cwd=REPO, capture_output=True,
                                 text=True, timeout=60)
            assert dry.returncode == 0, (command, dry.stderr)


def test_every_spinedet_command_of_the_readme_parses():
    import importlib

    from spinedet import cli

    for command in readme_commands():
        if not command.startswith("spinedet "):
            continue
        argv = shlex.split(command)[1:]
        stage = next(word for word in argv if word in cli.STAGES)
        parser = cli.build_parser()
        stage_parser = parser._subparsers._group_actions[0].choices[stage]  # noqa: SLF001
        importlib.import_module(cli.stage_module(stage)).add_arguments(stage_parser)
        parser.parse_args(argv)  # exits on an unknown option


def conda_available() -> bool:
    return any((Path(folder) / "conda").exists() for folder in os.environ.get("PATH", "").split(os.pathsep))


def test_every_snakemake_command_of_the_readme_dry_runs_as_printed(tmp_path):
    """With the venv activated as the README says; `-n` added. Without conda on PATH a
    --use-conda command runs without that flag (snakemake asks conda for its version
    even in a dry run), and says so."""
    venv_bin = Path(sys.executable).parent
    commands = [c for c in readme_commands() if c.startswith("snakemake ")]
    assert any("--profile profiles/slurm" in c for c in commands) and any("--use-conda" in c for c in commands)
    for command in commands:
        run = command
        if "--use-conda" in command and not conda_available():
            run = command.replace(" --use-conda", "")
            print(f"conda is not on PATH: dry-running {run!r} for {command!r}")
        done = subprocess.run(["bash", "-c", f"source {venv_bin}/activate && {run} -n"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        # (a study already run here has nothing to do: also a clean dry run)
        assert any(done_line in done.stdout + done.stderr for done_line in ("This was a dry-run", "Nothing to be done"))


# ---------------------------------------------------------------- config keys


def schema_keys(node: dict = SCHEMA, prefix: str = "", every: bool = False) -> set[str]:
    """Config key paths, `models.<name>.*` for a model entry. every=False: the keys a
    doc must describe (a rule's resources and a model's detector_kwargs count as one key
    each: their members are named in the schema's descriptions); every=True: all."""
    keys = set()
    for name, sub in node.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        keys.add(path)
        if "$ref" in sub:
            if every:
                keys |= schema_keys(SCHEMA["$defs"][sub["$ref"].rsplit("/", 1)[1]], path, every)
            continue
        if name in ("detector_kwargs", "fractions") and not every:
            continue
        keys |= schema_keys(sub, path, every)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and "$ref" in extra:
        keys.add(f"{prefix}.<name>")
        keys |= schema_keys(SCHEMA["$defs"][extra["$ref"].rsplit("/", 1)[1]], f"{prefix}.<name>", every)
    return keys


KEYS = schema_keys()
ALL_KEYS = schema_keys(every=True)
TOP_LEVEL = set(SCHEMA["properties"])


def normalised(token: str) -> str | None:
    """A backticked doc token as a config key path (`models.resnet50.lr: 0.01` ->
    models.<name>.lr), or None when it is not one (a file name, a value, code)."""
    token = re.split(r"[:\s=(]", token.strip(), maxsplit=1)[0].rstrip(".,")
    parts = token.split(".")
    if len(parts) < 2 or parts[0] not in TOP_LEVEL or parts[-1] in FILE_SUFFIXES:
        return None
    if not all(re.fullmatch(r"[a-z_<>][a-z0-9_<>-]*", part) for part in parts):
        return None  # e.g. a module constant, deid_tree.SIDECAR_ALLOWLIST
    if parts[0] == "models":
        parts[1] = "<name>"
    return ".".join(parts)


def configuration_table_keys() -> dict[str, str]:
    """The README's Configuration table: key -> row, the row's later keys relative to
    the section of its first one (`inventory.orientation`, `prefer` -> inventory.prefer)."""
    section = README[README.index("## Configuration"):]
    section = section[:section.index("\n## ", 3)]
    found = {}
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        first_cell = row.split("|")[1]
        names = re.findall(r"`([^`]+)`", first_cell)
        parent = ""
        for name in names:
            if "." in name:
                path = normalised(name) or name
                parent = path.rsplit(".", 1)[0]
            else:
                path = f"{parent}.{name}" if parent else name
            found[path] = row
        if len(names) == 1:  # `models.<name>` | `arch` (...), `pretrained` (...): its keys, described
            section_key = normalised(names[0]) or names[0]
            for name in re.findall(r"`([a-z_]+)`", "|".join(row.split("|")[2:])):
                if f"{section_key}.{name}" in ALL_KEYS:
                    found[f"{section_key}.{name}"] = row
    return found


def test_every_config_key_a_doc_names_is_in_the_schema():
    unknown = {}
    for doc, text in DOCS.items():
        for token in re.findall(r"`([^`\n]+)`", text):
            key = normalised(token)
            if key is not None and key not in ALL_KEYS:
                unknown.setdefault(doc, set()).add(token)
    unknown["README.md configuration table"] = {key for key in configuration_table_keys() if key not in ALL_KEYS}
    assert not {doc: tokens for doc, tokens in unknown.items() if tokens}


def test_every_schema_key_is_described_in_the_docs():
    named = set(configuration_table_keys())
    for text in DOCS.values():
        named |= {key for key in map(normalised, re.findall(r"`([^`\n]+)`", text)) if key}
    undescribed = sorted(key for key in KEYS if key not in named and key not in TOP_LEVEL - {"study"})
    top_level_named = {key for key in TOP_LEVEL if f"`{key}`" in README}
    assert not undescribed, undescribed
    assert top_level_named == TOP_LEVEL, sorted(TOP_LEVEL - top_level_named)


def test_the_key_checks_see_a_wrong_key():
    assert normalised("models.resnet50.lr: 0.01") == "models.<name>.lr"
    assert normalised("train.threads") in KEYS and normalised("train.thread") not in KEYS
    assert normalised("cohort.csv") is None and normalised("results/report") is None
    assert normalised("deid_tree.SIDECAR_ALLOWLIST") is None
    assert "resources.slices.threads" in ALL_KEYS and "models.<name>.detector_kwargs.rpn_nms_thresh" in ALL_KEYS


# ---------------------------------------------------------------- reason codes


def string_args(path: Path, call: str, position: int = 0) -> set[str]:
    """The literal arguments at `position` (default: the first) of every call of `call` in a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == call and len(node.args) > position:
            if isinstance(node.args[position], ast.Constant):
                found.add(node.args[position].value)
    return found


def keyword_values(path: Path, keyword: str) -> set[str]:
    """Literal values given as keyword=... or {"keyword": ...} in a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.keyword) and node.arg == keyword and isinstance(node.value, ast.Constant):
            found.add(node.value.value)
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == keyword and isinstance(value, ast.Constant):
                    found.add(value.value)
    return found


def returned_strings(path: Path, function: str) -> set[str]:
    tree = ast.parse(path.read_text())
    body = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function)
    return {node.value.value for node in ast.walk(body)
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) and node.value.value}


def import_issue_codes() -> set[str]:
    """Codes the annotation importers give: ImportIssue(source, ref, reason, ...), an
    _Unusable(reason, ...) region, or a row's "reason" value, in ingest/annotations/."""
    found = set()
    for path in sorted((PACKAGE / "ingest" / "annotations").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                position = {"ImportIssue": 2, "_Unusable": 0}.get(name)
                if position is not None and len(node.args) > position and isinstance(node.args[position], ast.Constant):
                    found.add(node.args[position].value)
        found |= keyword_values(path, "reason")
    return {code for code in found if isinstance(code, str) and code}


def reason_codes() -> dict[str, set[str]]:
    """Every code the pipeline writes into a table a person reads to find a lost item."""
    from spinedet.ingest.bids_import import REASONS as BIDS_REASONS
    from spinedet.ingest.quarantine import REASONS

    slices = PACKAGE / "dataset" / "slices.py"
    return {
        "files.csv": set(REASONS),
        "selection.csv": keyword_values(PACKAGE / "ingest" / "inventory.py", "status") - {"quarantined"},
        "conversions.csv": keyword_values(PACKAGE / "ingest" / "convert.py", "status"),
        "annotation_issues.csv": string_args(PACKAGE / "ingest" / "deidentify.py", "AnnotationIssue"),
        "dropped_boxes.csv": returned_strings(slices, "drop_reason") | {"outside_window"},
        "import_issues.csv": import_issue_codes(),
        "bids files.csv": set(BIDS_REASONS),
        # MaskIssue(name, reason, detail): the reasons of structures, not files
        "bids annotation_issues.csv": string_args(PACKAGE / "ingest" / "annotations" / "bids_masks.py", "MaskIssue",
                                                  position=1) - set(BIDS_REASONS),
    }


def test_every_reason_code_is_in_the_readmes_table():
    section = README[README.index("## When things go wrong"):]
    section = section[:section.index("\n## ", 3)]
    listed = set(re.findall(r"`([a-z_]+)`", section))
    codes = reason_codes()
    assert codes["files.csv"] >= {"duplicate", "not_a_file", "link_loop"}
    assert codes["annotation_issues.csv"] >= {"unknown_instance", "outside_image"}
    assert codes["selection.csv"] >= {"selected", "no_target_series", "no_files"}
    assert codes["import_issues.csv"] >= {"unknown_finding", "unsupported_graphic", "references_unknown_instance",
                                          "empty_segment", "not_in_cohort", "duplicate"}
    assert "outside_window" in (PACKAGE / "dataset" / "slices.py").read_text()
    missing = {table: sorted(found - listed) for table, found in codes.items() if found - listed}
    assert not missing, missing


@pytest.mark.parametrize("doc", ["docs/data-contracts.md"])
def test_data_contracts_list_every_file_reason(doc):
    from spinedet.ingest.quarantine import REASONS

    text = DOCS[doc]
    assert not [reason for reason in REASONS if not re.search(rf"\b{reason}\b", text)]
