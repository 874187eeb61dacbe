"""The phantom truth kept beside the export (`truth/`), read back by the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinedet import SpinedetError
from spinedet.io import read_csv, write_csv

@dataclass
class PatientResult:
    """What synthesize keeps of one patient: annotation rows, truth and a preview slice."""

    patient_id: str
    group: str
    annotations: list[dict]
    truth: dict
    preview_image: np.ndarray
    preview_boxes: list[tuple[str, tuple[int, int, int, int]]]
    files: int
    annotation_format: str = "csv"  # csv: `annotations` go to the sheet; sr, seg: an object in the export


def case_name(index: int, patients: int) -> str:
    return f"case-{index + 1:0{max(3, len(str(patients)))}d}"


def write_truth(truth_dir: Path, results: list[PatientResult]) -> None:
    truth_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for index, result in enumerate(results):
        case = case_name(index, len(results))
        np.savez_compressed(truth_dir / f"{case}.npz", **result.truth)
        cases.append({"case": case, "patient_id": result.patient_id, "group": result.group,
                      "n_lesions": len(result.truth["labels"])})
    write_csv(truth_dir / "cases.csv", cases, ["case", "patient_id", "group", "n_lesions"])


@dataclass
class CaseTruth:
    """Phantom truth of one patient's sagittal T2 (masks in spatial slice order)."""

    case: str
    patient_id: str
    group: str
    study_uid: str
    series_uid: str
    labels: list[str]
    kinds: list[str]
    levels: list[str]
    masks: np.ndarray  # bool (n_lesions, n_slices, rows, cols), slice k = spatial index
    instance_numbers: np.ndarray  # instance number of spatial slice k
    sop_instance_uids: list[str]
    ipp_first: np.ndarray
    iop: np.ndarray
    pixel_spacing: np.ndarray
    slice_step: float

    def mask(self, lesion: int, instance_number: int) -> np.ndarray:
        """The lesion's mask on the instance, in that instance's pixel grid (rows, cols)."""
        k = int(np.flatnonzero(self.instance_numbers == instance_number)[0])
        return self.masks[lesion, k]


def load_truth(root: Path) -> dict[str, CaseTruth]:
    """Read `root/truth/` back: {patient_id: CaseTruth}."""
    truth_dir = Path(root) / "truth"
    cases_csv = truth_dir / "cases.csv"
    if not cases_csv.is_file():
        raise SpinedetError(f"no truth in {truth_dir} (cases.csv missing)")
    truths = {}
    for row in read_csv(cases_csv):
        with np.load(truth_dir / f"{row['case']}.npz") as data:
            truths[row["patient_id"]] = CaseTruth(
                case=row["case"], patient_id=row["patient_id"], group=row["group"],
                study_uid=str(data["study_uid"]), series_uid=str(data["series_uid"]),
                labels=[str(v) for v in data["labels"]], kinds=[str(v) for v in data["kinds"]],
                levels=[str(v) for v in data["levels"]], masks=data["masks"],
                instance_numbers=data["instance_numbers"],
                sop_instance_uids=[str(v) for v in data["sop_instance_uids"]],
                ipp_first=data["ipp_first"], iop=data["iop"], pixel_spacing=data["pixel_spacing"],
                slice_step=float(data["slice_step"]),
            )
    return truths
