"""`spinedet bids-import`: a BIDS dataset with label masks in, the de-identified tree out.

For `raw_format: bids`. The dataset is already NIfTI, so there is no
dcm2niix; everything after this step is the DICOM path's:
- images: `sub-<id>[/ses-<s>]/anat/sub-<id>[_ses-<s>]..._<suffix>.nii[.gz]`
  (`bids.suffix`, default T2w); one per subject (the first in sorted order,
  the others are listed);
- cohort: `cohort.csv` when configured, else `participants.tsv`
  (`participant_id` and the `bids.group_column`);
- masks: under `bids.derivatives`, named after their image
  (spinedet.ingest.annotations.bids_masks).

As in `spinedet deidentify`, subject labels are pseudonymised by HMAC
(spinedet.ingest.deid_tree), NIfTI text fields are cleared and a sidecar
keeps only its allowlisted keys. Every file under the root gets a row in
`--files` (restricted: it names subjects): `used`, `ignored` or
`quarantined` with a reason; `--summary` holds PHI-free counts only.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import pandas as pd
from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.geometry import acquisition_plane
from spinedet.ingest.annotations.bids_masks import (
    FILE_ISSUES,
    left_right_axis,
    mask_boxes,
    mask_kind,
    nifti_stem,
    scrubbed_error,
)
from spinedet.ingest.dicom import SNAKEMAKE_MARKER
from spinedet.ingest.deid_tree import (
    PSEUDONYM_COLUMNS,
    finish_tree,
    load_or_create_key,
    pseudonymise,
    scrubbed_nifti_bytes,
    scrubbed_sidecar,
    subject_paths,
    write_json_sorted,
    write_subject_boxes,
)
from spinedet.io import write_bytes, write_csv, write_json

log = logging.getLogger(__name__)

FILE_COLUMNS = ["path", "status", "reason", "detail", "subject"]
# Reason codes of files.csv for a BIDS dataset (status ignored or quarantined).
REASONS = {
    "not_target_image": "an image of another suffix or datatype than bids.suffix under anat/",
    "second_image": "the subject has another image of the suffix, which was used (one volume per patient)",
    "not_sagittal": "the image was acquired axially, coronally or obliquely: the detectors read sagittal slices",
    "not_in_cohort": "the subject is not in the cohort (participants.tsv or cohort.csv)",
    "no_image": "a cohort subject without a usable image of the suffix (its row names the subject's folder)",
    "unreadable_image": "the image cannot be read as a 3-D NIfTI volume",
    "unreadable_sidecar": "the image's JSON sidecar cannot be read: the image is used without its keys",
    "orphan_mask": "a mask under the derivative that names no used image",
    "no_dseg_table": "a _dseg mask without a dseg.tsv (index, name)",
    "unreadable_mask": "the mask cannot be read or resampled",
    "not_bids": "a file that is none of the above (kept out of the study)",
}
SUBJECT = re.compile(r"sub-([a-zA-Z0-9]+)")
NIFTI = re.compile(r"\.nii(\.gz)?$")
METADATA_FILES = {"dataset_description.json", "participants.tsv", "participants.json", "README", "README.md",
                  "CHANGES", "LICENSE", "dseg.tsv", ".bidsignore"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--raw", required=True, type=Path, help="BIDS dataset root")
    parser.add_argument("--cohort", type=Path, default=None,
                        help="cohort.csv (patient_id = subject label without sub-, group); default: participants.tsv")
    parser.add_argument("--restricted", required=True, type=Path,
                        help="restricted folder (pseudonym key and table, bids/files.csv)")
    parser.add_argument("--key-file", type=Path, default=None,
                        help="HMAC key file (hex); default: the workflow's key, as for spinedet deidentify")
    parser.add_argument("--files", required=True, type=Path, help="restricted table of every file (written)")
    parser.add_argument("--summary", required=True, type=Path, help="PHI-free counts (JSON, written)")
    parser.add_argument("--out", required=True, type=Path, help="de-identified output folder")


def read_bids_cohort(root: Path, cohort_csv: Path | None, bids: dict, groups: list[str]) -> dict[str, str]:
    """{subject label: group} from cohort.csv, else participants.tsv; errors name the line."""
    if cohort_csv is not None:
        path, id_column, group_column, sep = Path(cohort_csv), "patient_id", "group", ","
    else:
        path, id_column, group_column, sep = Path(root) / "participants.tsv", "participant_id", bids["group_column"], "\t"
    if not path.is_file():
        raise SpinedetError(f"cohort not found: {path} (a BIDS dataset needs participants.tsv, or set config key "
                            "'cohort' to a cohort.csv)")
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    missing = {id_column, group_column} - set(table.columns)
    if missing:
        raise SpinedetError(f"{path}: missing column(s) {', '.join(sorted(missing))}"
                            + (" (the group column is config key 'bids.group_column')" if cohort_csv is None else ""))
    cohort: dict[str, str] = {}
    for line, record in enumerate(table.to_dict(orient="records"), start=2):
        subject = record[id_column].strip().removeprefix("sub-")
        group = record[group_column].strip()
        if not SUBJECT.fullmatch(f"sub-{subject}"):
            raise SpinedetError(f"{path} line {line}: {id_column} must be sub-<alphanumeric label>")
        if group not in groups:
            raise SpinedetError(f"{path} line {line}: group {group!r} is not one of the config's groups {groups}")
        if subject in cohort:
            raise SpinedetError(f"{path} line {line}: this participant is listed twice")
        cohort[subject] = group
    return cohort


def subject_of(relative: Path) -> str:
    match = SUBJECT.fullmatch(relative.parts[0]) if relative.parts else None
    return match[1] if match else ""


def find_images(root: Path, files: list[Path], suffix: str) -> tuple[dict[str, Path], dict[Path, dict]]:
    """({subject: its image}, {path: files.csv row} of the other NIfTI files under sub-*/).

    A subject's image is its first `_<suffix>` image in sorted order that was acquired
    sagittally (its thickest voxel axis along left-right) or isotropically, judged by the
    affine, as predict judges its input; the others are listed."""
    chosen: dict[str, Path] = {}
    rows: dict[Path, dict] = {}
    for path in files:
        relative = path.relative_to(root)
        subject = subject_of(relative)
        if not subject or not NIFTI.search(path.name):
            continue
        if relative.parent.name != "anat" or not re.search(rf"_{re.escape(suffix)}\.nii(\.gz)?$", path.name):
            rows[path] = {"status": "ignored", "reason": "not_target_image",
                          "detail": f"not an anat/*_{suffix}.nii[.gz] image (config key 'bids.suffix')"}
            continue
        if subject in chosen:
            rows[path] = {"status": "ignored", "reason": "second_image",
                          "detail": f"another _{suffix} image of this subject was used: {chosen[subject].name}"}
            continue
        try:
            plane, sizes = acquisition_plane(nib.load(path).affine)
        except Exception as exc:  # a damaged header: nibabel raises many types
            rows[path] = {"status": "quarantined", "reason": "unreadable_image", "detail": scrubbed_error(exc, path)}
            continue
        if plane in ("sagittal", "isotropic"):
            chosen[subject] = path
        else:
            rows[path] = {"status": "ignored", "reason": "not_sagittal",
                          "detail": f"acquired {plane} (voxel sizes {sizes} mm): export the sagittal series"}
    return chosen, rows


def sidecar_of(image: Path) -> Path:
    return image.with_name(nifti_stem(image) + ".json")


def scrubbed_bids_sidecar(path: Path | None, image: nib.spatialimages.SpatialImage) -> dict:
    """The allowlisted keys of a BIDS sidecar (the same keys as dcm2niix's; none without one),
    plus the voxel sizes. Raises ValueError (or OSError) for one that is not a readable JSON object."""
    kept = scrubbed_sidecar(path) if path is not None and path.is_file() else {}
    kept["VoxelSizes"] = [round(float(z), 6) for z in image.header.get_zooms()[:3]]
    return kept


def bids_import(root: Path, cohort: dict[str, str], key: bytes, config: dict, out: Path,
                restricted: Path) -> tuple[list[dict], dict]:
    """Write the de-identified tree; return (files.csv rows, PHI-free summary)."""
    root, out = Path(root), Path(out)
    bids = config["bids"]
    classes = list(config["classes"])
    derivative_root = root / bids["derivatives"]
    # (the marker Snakemake leaves in a directory() output, when the demo wrote the dataset, is not data)
    files = sorted(path for path in root.rglob("*") if (path.is_file() or path.is_symlink())
                   and path != root / SNAKEMAKE_MARKER)
    images, rows = find_images(root, [p for p in files if not p.is_relative_to(derivative_root)], bids["suffix"])
    for subject, image in list(images.items()):
        if subject not in cohort:
            rows[image] = {"status": "quarantined", "reason": "not_in_cohort",
                           "detail": "add the subject to participants.tsv (or cohort.csv) with a group"}
            del images[subject]
    masks = [p for p in files if p.is_relative_to(derivative_root) and NIFTI.search(p.name)]
    masks_of: dict[str, list[tuple[Path, str, str]]] = {subject: [] for subject in images}
    for mask in masks:
        relative = mask.relative_to(derivative_root)
        image = images.get(subject_of(relative))
        kind = mask_kind(mask, image) if image is not None else None
        if kind is None:
            rows[mask] = {"status": "ignored", "reason": "orphan_mask",
                          "detail": "names no used image: it must be <image name>_label-<name>_mask.nii.gz or "
                                    "<image name>_dseg.nii.gz in the subject's folder of the derivative"}
        else:
            masks_of[subject_of(relative)].append((mask, *kind))

    pseudonyms = pseudonymise(sorted(images), key, config["deidentify"]["pseudonym_length"])
    write_csv(Path(restricted) / "pseudonyms.csv",
              [{"patient_id": subject, "pseudonym": p} for subject, p in pseudonyms.items()], PSEUDONYM_COLUMNS)
    participants, issues = [], []
    counts = Counter()
    for subject in tqdm(sorted(images), desc="bids-import", unit="patient"):
        image_path, pseudo = images[subject], pseudonyms[subject]
        try:
            image = nib.load(image_path)
            if len(image.shape) != 3 and not (len(image.shape) == 4 and image.shape[3] == 1):
                raise ValueError(f"shape {tuple(image.shape)} is not a 3-D volume")
            nifti_bytes = scrubbed_nifti_bytes(image_path)
        except Exception as exc:  # a damaged file: nibabel raises many types
            rows[image_path] = {"status": "quarantined", "reason": "unreadable_image",
                                "detail": f"{type(exc).__name__}: {exc}"[:300]}
            for mask, _, _ in masks_of[subject]:
                rows[mask] = {"status": "ignored", "reason": "orphan_mask", "detail": "its image was quarantined"}
            continue
        rows[image_path] = {"status": "used", "reason": "", "detail": ""}
        paths = subject_paths(out, pseudo, bids["suffix"])
        write_bytes(paths["nifti"], nifti_bytes)
        sidecar = sidecar_of(image_path)
        try:
            kept = scrubbed_bids_sidecar(sidecar, image)
            if sidecar.is_file():
                rows[sidecar] = {"status": "used", "reason": "", "detail": "allowlisted keys kept"}
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            kept = scrubbed_bids_sidecar(None, image)
            rows[sidecar] = {"status": "quarantined", "reason": "unreadable_sidecar",
                             "detail": scrubbed_error(exc, sidecar) + ": the image is used without its keys"}
        write_json_sorted(paths["sidecar"], kept)
        boxes = []
        for mask, kind, name in masks_of[subject]:
            found, mask_issues, resampled = mask_boxes(mask, kind, name, image, derivative_root,
                                                       bids["label_map"], classes)
            boxes += found
            counts["masks_resampled"] += resampled
            file_issue = next((issue for issue in mask_issues if issue.reason in FILE_ISSUES), None)
            rows[mask] = ({"status": "quarantined", "reason": file_issue.reason, "detail": file_issue.detail}
                          if file_issue else {"status": "used", "reason": "", "detail": f"{len(found)} boxes"
                                              + (", resampled onto the image's grid" if resampled else "")})
            table = mask.with_name(nifti_stem(mask) + ".tsv")
            if table.is_file():
                rows[table] = {"status": "used", "reason": "", "detail": "the dseg's label table"}
            for issue in mask_issues:
                issues.append({"pseudonym": pseudo, "row": "", "label": "", "reason": issue.reason,
                               "detail": f"{kind} mask" + (f" label {issue.name!r}" if issue.name else "")
                                         + f": {issue.detail}"})
        write_subject_boxes(out, pseudo, cohort[subject], left_right_axis(image.affine), boxes)
        participants.append({"pseudonym": pseudo, "group": cohort[subject]})
        counts["boxes"] += len(boxes)
    finish_tree(out, participants, issues)

    table_rows = []
    for path in files:
        relative = path.relative_to(root)
        row = rows.get(path)
        image_rows = [rows.get(path.with_name(path.stem + ext)) for ext in (".nii.gz", ".nii")]
        image_row = next((r for r in image_rows if r), None) if path.name.endswith(".json") else None
        if row is None and image_row is not None and image_row["status"] != "used":
            row = {**image_row, "status": "ignored", "detail": "the sidecar of an image not used: " + image_row["detail"]}
        if row is None:
            known = path.name in METADATA_FILES or (path.name.endswith(".json") and not subject_of(relative))
            row = ({"status": "used" if path.name in ("participants.tsv", "dseg.tsv") else "ignored",
                    "reason": "", "detail": "dataset metadata"} if known else
                   {"status": "ignored", "reason": "not_bids", "detail": "not an image, sidecar or mask this "
                    "study reads"})
        in_derivative = path.is_relative_to(derivative_root)
        subject = subject_of(path.relative_to(derivative_root) if in_derivative else relative)
        table_rows.append({"path": str(relative), "subject": subject, **row})
    # a cohort subject with no usable image: one row naming its folder
    used_subjects = {row["subject"] for row in table_rows if row["status"] == "used" and row["subject"]}
    for subject in sorted(set(cohort) - used_subjects):
        table_rows.append({"path": f"sub-{subject}/", "subject": subject, "status": "quarantined", "reason": "no_image",
                           "detail": f"in the cohort, but no readable sagittal anat/*_{bids['suffix']}.nii[.gz] "
                                     "(see the subject's other rows)"})
    status = Counter(row["status"] for row in table_rows)
    reasons = Counter(row["reason"] for row in table_rows if row["reason"])
    summary = {
        "raw_format": "bids",
        "files_in": len(table_rows),
        "used": status["used"],
        "ignored": status["ignored"],
        "quarantined": status["quarantined"],
        "files_by_reason": dict(sorted(reasons.items())),
        "cohort_patients": len(cohort),
        "patients_selected": len(participants),
        "patients_without_target": len(set(cohort) - {p for p in used_subjects}),
        "masks_read": sum(len(m) for m in masks_of.values()),
        "masks_resampled": counts["masks_resampled"],
        "boxes": counts["boxes"],
        "label_issues": dict(sorted(Counter(issue["reason"] for issue in issues).items())),
    }
    return table_rows, summary


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load, pseudonym_key_file

    config = load(args.config)
    if Path(args.restricted).resolve().is_relative_to(Path(args.out).resolve()):
        raise SpinedetError(f"the restricted folder {args.restricted} lies inside --out {args.out}: "
                            "the key would leave restricted/")
    if not (args.raw / "dataset_description.json").is_file():
        log.warning("%s holds no dataset_description.json: is it the root of a BIDS dataset?", args.raw)
    cohort = read_bids_cohort(args.raw, args.cohort, config["bids"], list(config["groups"]))
    key = load_or_create_key(args.restricted, args.key_file or pseudonym_key_file(config))
    table_rows, summary = bids_import(args.raw, cohort, key, config, args.out, args.restricted)
    write_csv(args.files, table_rows, FILE_COLUMNS)
    write_json(args.summary, summary, indent=2)
    log.info("%d of %d cohort patients imported, %d boxes from %d masks (%d resampled); files: %s",
             summary["patients_selected"], summary["cohort_patients"], summary["boxes"], summary["masks_read"],
             summary["masks_resampled"], {k: summary[k] for k in ("used", "ignored", "quarantined")})
    if not summary["patients_selected"]:
        raise SpinedetError(f"0 of {summary['cohort_patients']} cohort patients have an image "
                            f"sub-*/anat/*_{config['bids']['suffix']}.nii.gz under {args.raw}: nothing to slice "
                            f"(see {args.files})")
    return 0
