"""Running the real dcm2niix on one series.

The series' files are linked into a private folder under numbered names (so
no raw file name, which may carry identity, reaches dcm2niix's output) and
converted with `-z y -b y -ba y -f series`: the output name never holds
dcm2niix's identity placeholders. Shared by `spinedet convert` and
`spinedet predict`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from spinedet import SpinedetError

DCM2NIIX_FLAGS = ["-z", "y", "-b", "y", "-ba", "y", "-f", "series"]
DCM2NIIX_TIMEOUT_S = 600
OUTPUT_NAME = "series"


def find_dcm2niix() -> str:
    """The dcm2niix binary of the `dcm2niix` pip package, else the one on PATH."""
    try:
        import dcm2niix

        packaged = Path(dcm2niix.bin)
        if packaged.is_file() and os.access(packaged, os.X_OK):
            return str(packaged)
    except ImportError:
        pass
    on_path = shutil.which("dcm2niix")
    if on_path is None:
        raise SpinedetError("dcm2niix not found: install the 'dcm2niix' pip package or put the "
                            "binary on PATH")
    return on_path


# dcm2niix lines that say nothing about what went wrong.
ROUTINE_OUTPUT = re.compile(r"(Chris Rorden's dcm2niiX|Found \d+ DICOM|Convert \d+ DICOM as|"
                            r"Conversion required)")


def _condense(output: str, limit: int = 500) -> str:
    """dcm2niix's messages, less the routine ones, on one line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return " | ".join(line for line in lines if not ROUTINE_OUTPUT.match(line))[:limit]


def _link_inputs(files: list[Path], input_dir: Path) -> None:
    """Numbered links (or copies, where links are not allowed) of the series' files."""
    for number, source in enumerate(files, start=1):
        target = input_dir / f"{number:05d}.dcm"
        try:
            target.symlink_to(source.resolve())
        except OSError:
            shutil.copyfile(source, target)


def run_dcm2niix(files: list[Path], out_dir: Path, work_dir: Path | None = None,
                 binary: str | None = None, pixels_per_image: int | None = None,
                 images: int | None = None) -> dict:
    """Convert one series' files into `out_dir` (emptied first).

    Returns {"status": "converted"|"quarantined", "nifti", "sidecar",
    "message", "output"} where `output` is dcm2niix's stdout+stderr. With
    `pixels_per_image` (rows x columns), a volume whose voxel count is not
    that times the number of `images` (default: one per file; a multi-frame
    file holds several) is quarantined too. (The slice axis is not checked:
    dcm2niix may rotate 3D acquisitions.)
    """
    binary = binary or find_dcm2niix()
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    result = {"status": "quarantined", "nifti": "", "sidecar": "", "message": "", "output": ""}

    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        result["message"] = (f"{len(missing)} of the series' {len(files)} files are gone since "
                             "the inventory: rerun the inventory")
        return result
    with tempfile.TemporaryDirectory(prefix="dcm2niix-input-", dir=work_dir or out_dir.parent) as tmp:
        input_dir = Path(tmp)
        _link_inputs([Path(f) for f in files], input_dir)
        command = [binary, *DCM2NIIX_FLAGS, "-o", str(out_dir), str(input_dir)]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                       timeout=DCM2NIIX_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            result["message"] = f"dcm2niix did not finish within {DCM2NIIX_TIMEOUT_S} s"
            return result
    output = completed.stdout + completed.stderr
    result["output"] = output

    volumes = sorted(p.name for p in out_dir.glob("*.nii*"))
    if completed.returncode != 0:
        result["message"] = f"dcm2niix exit status {completed.returncode}: {_condense(output)}"
    elif not volumes:
        result["message"] = f"dcm2niix wrote no volume: {_condense(output)}"
    elif len(volumes) > 1:
        result["message"] = (f"dcm2niix split the series into {len(volumes)} volumes "
                             f"({', '.join(volumes)}): {_condense(output)}")
    else:
        nifti = out_dir / volumes[0]
        sidecar = nifti.with_name(nifti.name.split(".")[0] + ".json")
        shape = nib.load(nifti).shape
        voxels = int(np.prod(shape))
        if any(n != 1 for n in shape[3:]):
            result["message"] = f"dcm2niix wrote a {len(shape)}-D volume of shape {shape}, not one 3-D volume"
        elif pixels_per_image and voxels != pixels_per_image * (images or len(files)):
            result["message"] = (f"the volume of shape {shape} does not hold the series' {images or len(files)} "
                                 f"images of {pixels_per_image} pixels: {_condense(output)}")
        elif not sidecar.is_file():
            result["message"] = "dcm2niix wrote no JSON sidecar"
        else:
            result.update(status="converted", nifti=nifti.as_posix(), sidecar=sidecar.as_posix(),
                          message=_condense(output))
    return result
