"""Preprocessing at scale: synthesize N patients, then inventory -> split through
Snakemake, and report where the time and memory go.

    .venv/bin/python benchmarks/preprocess_scale.py --patients 100 [--patients 500 ...]

Per patient count, in a fresh folder under --work (default /tmp/spinedet_scale):
- synthesis wall time (`spinedet synthesize --workers {cores}`, the demo's generator);
- the DAG build: `snakemake -n` wall time on the full study (no checkpoint: the
  DAG no longer grows with the patients);
- each stage's seconds and peak memory (max RSS) from Snakemake's own
  benchmark files, and Snakemake's overhead (the run's wall time minus the
  stages' seconds);
- seconds per patient, and the growth against the first count given (a ratio
  above the patient ratio means worse than linear).

Run it alone on the machine: other work changes every number. It prints a
Markdown table and appends one JSON line per count to
benchmarks/results/preprocess_scale.jsonl; `--table` prints the table of
every line there.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["inventory", "convert", "deidentify", "slices", "split"]
RESULTS = REPO / "benchmarks" / "results" / "preprocess_scale.jsonl"


def run(command: list[str], cwd: Path) -> float:
    """Wall seconds of a command that must succeed."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def benchmark_row(path: Path) -> dict:
    with path.open() as fh:
        row = next(csv.DictReader(fh, delimiter="\t"))
    return {"s": float(row["s"]), "max_rss_mb": float(row["max_rss"]) if row["max_rss"] != "-" else None}


def measure(patients: int, cores: int, work: Path) -> dict:
    folder = work / f"patients_{patients}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    export = folder / "export"
    synthesis = run([sys.executable, "-m", "spinedet.cli", "synthesize", "--out", str(export), "--patients",
                     str(patients), "--matrix", "256", "--seed", "7", "--workers", str(cores)], folder)
    overrides = folder / "scale.yaml"
    overrides.write_text(json.dumps({
        "raw": str(export / "DICOM"), "annotations": str(export / "annotations.csv"),
        "cohort": str(export / "cohort.csv"), "results": str(folder / "results"),
        "restricted": str(folder / "restricted"),
        "demo": {"enabled": False},
        "deidentify": {"key_file": str(export / "pseudonym.key")},
        "resources": {"slices": {"threads": cores}},
    }))
    snakemake = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                 str(folder), "--cores", str(cores)]
    configs = ["--configfile", str(REPO / "config.yaml"), str(overrides)]
    dag = run([*snakemake, "-n", *configs], folder)
    wall = run([*snakemake, str(folder / "results" / "split" / "train.json"), *configs], folder)
    stages = {stage: benchmark_row(folder / "results" / "benchmarks" / f"{stage}.tsv") for stage in STAGES}
    stage_seconds = sum(s["s"] for s in stages.values())
    return {
        "patients": patients,
        "cores": cores,
        "synthesis_s": round(synthesis, 1),
        "dag_dry_run_s": round(dag, 2),
        "inventory_to_split_wall_s": round(wall, 1),
        "snakemake_overhead_s": round(wall - stage_seconds, 1),
        "stages": stages,
        "peak_rss_mb": max(s["max_rss_mb"] or 0 for s in stages.values()),
        "machine": {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
                    "load_average_1min_after": round(os.getloadavg()[0], 2)},
    }


def table(results: list[dict]) -> str:
    base = results[0]
    lines = ["| patients | synthesis s | DAG (-n) s | " + " | ".join(f"{s} s" for s in STAGES)
             + " | inventory -> split wall s | Snakemake overhead s | s/patient | peak RSS MB | growth vs first |",
             "|" + "--:|" * (len(STAGES) + 8)]
    for r in results:
        growth = (r["inventory_to_split_wall_s"] / base["inventory_to_split_wall_s"]) / (r["patients"] / base["patients"])
        lines.append(
            f"| {r['patients']} | {r['synthesis_s']} | {r['dag_dry_run_s']} | "
            + " | ".join(f"{r['stages'][s]['s']:.1f}" for s in STAGES)
            + f" | {r['inventory_to_split_wall_s']} | {r['snakemake_overhead_s']} | "
            f"{r['inventory_to_split_wall_s'] / r['patients']:.3f} | {r['peak_rss_mb']:.0f} | {growth:.2f} |")
    lines.append("")
    lines.append("growth vs first: (wall / first wall) / (patients / first patients); 1.00 = linear.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, action="append", help="patient count (repeatable)")
    parser.add_argument("--table", action="store_true",
                        help="print the table of every run in benchmarks/results/preprocess_scale.jsonl and stop")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spinedet_scale"))
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    args = parser.parse_args()
    if args.table:
        with RESULTS.open() as fh:
            print(table(sorted((json.loads(line) for line in fh), key=lambda r: r["patients"])))
        return
    if not args.patients:
        parser.error("give --patients N (or --table)")
    results = []
    for patients in args.patients:
        result = measure(patients, args.cores, args.work)
        results.append(result)
        with RESULTS.open("a") as fh:
            fh.write(json.dumps(result) + "\n")
        if not args.keep:
            shutil.rmtree(args.work / f"patients_{patients}", ignore_errors=True)
    print(table(results))


if __name__ == "__main__":
    main()
