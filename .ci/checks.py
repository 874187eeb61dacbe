"""Checks that .ci/run makes on workflow runs (standard library only).

  submitted LOG --rules R [R ...] --local-only R [R ...]
      the snakemake log shows sbatch submissions for each rule in --rules,
      each with its SLURM log file, and none for the --local-only rules
  toy DIR LOG          the toy workflow's jobs ran under SLURM (job ids match
                       the submissions; the GPU job saw CUDA_VISIBLE_DEVICES)
  failed LOG           a failed SLURM job was reported with its log paths
  compare LOCAL SLURM  two results folders hold the same tables
  digest DIR           one sha256 over every file (path and content) under DIR
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
import sys
from pathlib import Path

SUBMITTED = re.compile(
    r"Job (?P<job>\d+) has been submitted with SLURM jobid (?P<slurm_id>\d+) \(log: (?P<log>[^)]+)\)"
)

# Report columns that measure speed or hardware, not results: they differ
# between any two runs and are left out of the comparison.
TIMING_COLUMN = re.compile(r"(timing|second|sec\b|_s$|_ms$|time|latency|throughput|speed|per_image|hardware|device)", re.I)

# Files that must be byte-identical between two runs of the same config.
IDENTICAL_FILES = [
    "inventory/summary.json",
    "annotations/summary.json",
    "deid/participants.csv",
    "deid/annotation_issues.csv",
    "deid/sub-*/sub-*_boxes.json",
    "slices/sub-*/coco.json",
    "slices/sub-*/*.png",
    "split/*.json",
    "split/*.csv",
    "report/comparison.json",
    "eval/*/detections.json",
]


class CheckFailed(Exception):
    pass


def submissions(log_text: str) -> list[dict]:
    """sbatch submissions in a snakemake log: job, slurm_id, log path and rule."""
    found = []
    for match in SUBMITTED.finditer(log_text):
        log_path = Path(match["log"])
        rule = next((part[len("rule_"):] for part in log_path.parts if part.startswith("rule_")), None)
        found.append({"job": match["job"], "slurm_id": match["slurm_id"], "log": log_path, "rule": rule})
    return found


def check_submitted(log_file: Path, rules: list[str], local_only: list[str]) -> list[dict]:
    found = submissions(log_file.read_text(errors="replace"))
    if not found:
        raise CheckFailed(f"{log_file}: no 'submitted with SLURM jobid' lines: nothing went through sbatch")
    by_rule: dict[str, list[dict]] = {}
    for item in found:
        by_rule.setdefault(item["rule"], []).append(item)
    missing = [rule for rule in rules if rule not in by_rule]
    if missing:
        raise CheckFailed(f"{log_file}: no SLURM submission for rule(s) {', '.join(missing)}")
    leaked = [rule for rule in local_only if rule in by_rule]
    if leaked:
        raise CheckFailed(f"{log_file}: rule(s) {', '.join(leaked)} must run on the submit host, but went to SLURM")
    for item in found:
        if not item["log"].is_file():
            raise CheckFailed(f"SLURM log of job {item['slurm_id']} ({item['rule']}) not found: {item['log']}")
    for rule, items in sorted(by_rule.items()):
        print(f"  {rule}: SLURM job(s) {', '.join(i['slurm_id'] for i in items)}")
    return found


def check_toy(run_dir: Path, log_file: Path) -> None:
    found = check_submitted(log_file, ["item", "gpu", "summary"], ["start"])
    slurm_ids = {item["slurm_id"] for item in found}

    def job_of(path: Path) -> dict:
        text = path.read_text().split()
        return dict(field.split("=", 1) for field in text if "=" in field)

    start = job_of(run_dir / "toy" / "start.txt")
    if start["job"] != "none":
        raise CheckFailed(f"localrule start ran inside SLURM job {start['job']}")
    for item in ("a", "b", "c"):
        fields = job_of(run_dir / "toy" / "item" / f"{item}.txt")
        if fields["job"] not in slurm_ids:
            raise CheckFailed(f"item {item} ran outside the submitted SLURM jobs: {fields}")
    gpu = job_of(run_dir / "toy" / "gpu.txt")
    if gpu["job"] not in slurm_ids or gpu["cuda"] == "none" or gpu["cpus"] != "2":
        raise CheckFailed(f"gpu job did not get its GPU and 2 CPUs from SLURM: {gpu}")
    print(f"  toy: {len(found)} jobs through sbatch, GPU job saw CUDA_VISIBLE_DEVICES={gpu['cuda']}")


def check_failed(log_file: Path) -> None:
    text = log_file.read_text(errors="replace")
    if "SLURM status is: 'FAILED'" not in text:
        raise CheckFailed(f"{log_file}: the failed SLURM job was not reported as FAILED")
    found = submissions(text)
    if not found:
        raise CheckFailed(f"{log_file}: the failing job was never submitted")
    slurm_log = found[0]["log"]
    error_logs = re.search(r"Error in rule \w+:.*?\n\s+log: (?P<logs>[^\n]+)", text, re.S)
    if not error_logs or str(slurm_log) not in error_logs["logs"]:
        raise CheckFailed(f"{log_file}: the error message does not name the SLURM log {slurm_log}")
    if not slurm_log.is_file():
        raise CheckFailed(f"SLURM log named in the error does not exist: {slurm_log}")
    print(f"  failure reported with its logs: {error_logs['logs'].strip()}")


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return (rows[0], rows[1:]) if rows else ([], [])


def compare_csv_without_timing(local: Path, slurm: Path) -> list[str]:
    header_local, rows_local = read_csv(local)
    header_slurm, rows_slurm = read_csv(slurm)
    if header_local != header_slurm:
        return [f"{local.name}: columns differ: {header_local} vs {header_slurm}"]
    keep = [i for i, name in enumerate(header_local) if not TIMING_COLUMN.search(name)]
    ignored = [name for name in header_local if TIMING_COLUMN.search(name)]
    if ignored:
        print(f"  {local.name}: timing columns not compared: {', '.join(ignored)}")
    if len(rows_local) != len(rows_slurm):
        return [f"{local}: {len(rows_local)} rows vs {len(rows_slurm)}"]
    problems = []
    for number, (a, b) in enumerate(zip(rows_local, rows_slurm), start=1):
        for i in keep:
            if a[i] != b[i]:
                problems.append(f"{local} row {number} column {header_local[i]}: {a[i]} vs {b[i]}")
    return problems


def json_differences(a, b, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys differ: {sorted(set(a) ^ set(b))}"]
        return [d for key in a for d in json_differences(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def compare_runs(local: Path, slurm: Path) -> None:
    problems: list[str] = []
    for pattern in IDENTICAL_FILES:
        local_files = sorted(p.relative_to(local) for p in local.glob(pattern))
        slurm_files = sorted(p.relative_to(slurm) for p in slurm.glob(pattern))
        if not local_files:
            problems.append(f"{local}/{pattern}: no such files")
            continue
        if local_files != slurm_files:
            problems.append(f"{pattern}: different files: {sorted(set(map(str, local_files)) ^ set(map(str, slurm_files)))}")
            continue
        differing = [str(p) for p in local_files if file_digest(local / p) != file_digest(slurm / p)]
        problems += [f"{name}: content differs" for name in differing]
        print(f"  {pattern}: {len(local_files) - len(differing)}/{len(local_files)} identical")

    for metrics in sorted(local.glob("eval/*/metrics.json")):
        other = slurm / metrics.relative_to(local)
        if not other.is_file():
            problems.append(f"{other}: missing")
            continue
        differences = json_differences(json.loads(metrics.read_text()), json.loads(other.read_text()), str(metrics.relative_to(local)))
        problems += differences
        print(f"  {metrics.relative_to(local)}: {'identical' if not differences else f'{len(differences)} values differ'}")

    tables = sorted(local.glob("models/*/train_log.csv")) + sorted(local.glob("report/*.csv"))
    if not any(p.parts[-2] == "report" for p in tables):
        problems.append(f"{local}/report/*.csv: no report tables")
    for table in tables:
        other = slurm / table.relative_to(local)
        if not other.is_file():
            problems.append(f"{other}: missing")
            continue
        problems += compare_csv_without_timing(table, other)

    if problems:
        raise CheckFailed("local and SLURM results differ:\n  " + "\n  ".join(problems))
    print("  local and SLURM results agree")


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + file_digest(path).encode())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="check", required=True)
    p = sub.add_parser("submitted")
    p.add_argument("log", type=Path)
    p.add_argument("--rules", nargs="+", required=True)
    p.add_argument("--local-only", nargs="*", default=[])
    p = sub.add_parser("toy")
    p.add_argument("run_dir", type=Path)
    p.add_argument("log", type=Path)
    p = sub.add_parser("failed")
    p.add_argument("log", type=Path)
    p = sub.add_parser("compare")
    p.add_argument("local", type=Path)
    p.add_argument("slurm", type=Path)
    p = sub.add_parser("digest")
    p.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.check == "submitted":
            check_submitted(args.log, args.rules, args.local_only)
        elif args.check == "toy":
            check_toy(args.run_dir, args.log)
        elif args.check == "failed":
            check_failed(args.log)
        elif args.check == "digest":
            print(tree_digest(args.root))
        else:
            compare_runs(args.local, args.slurm)
    except CheckFailed as exc:
        print(f"CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
