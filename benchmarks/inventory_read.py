"""Inventory throughput: spinedet's header-only classification of every file
vs the naive baseline of reading each file whole with pydicom, on the same
synthetic export, in the same process.

    .venv/bin/python benchmarks/inventory_read.py --patients 8 --matrix 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pydicom

from spinedet.ingest.dicom import list_files, read_file
from spinedet.demo.synthesize import synthesize


def files_per_second(paths: list[Path], read) -> float:
    start = time.perf_counter()
    for path in paths:
        read(path)
    return len(paths) / (time.perf_counter() - start)


def read_whole(path: Path) -> None:
    pydicom.dcmread(path).pixel_array  # noqa: B018 (decoding the pixels is the cost measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--matrix", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp), patients=args.patients, matrix=args.matrix, seed=1)
        paths = list_files(Path(tmp) / "DICOM")
        # Warm the page cache so both readers see the same I/O.
        for path in paths:
            path.read_bytes()
        whole = files_per_second(paths, read_whole)
        headers = files_per_second(paths, read_file)
    print(f"{len(paths)} files, matrix {args.matrix}")
    print(f"read whole + decode pixels (baseline): {whole:8.0f} files/s")
    print(f"spinedet inventory.read_file:          {headers:8.0f} files/s  ratio {headers / whole:.2f}x")


if __name__ == "__main__":
    main()
