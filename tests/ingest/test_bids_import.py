"""BIDS datasets with label masks: dseg + dseg.tsv, _label-<name>_mask, masks on another
grid, any voxel order, unmapped names, and every file accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spinedet import SpinedetError
from spinedet.cli import main
from spinedet.config import load
from spinedet.geometry import voxel_to_ras
from spinedet.ingest.annotations.bids_masks import component_boxes, mask_boxes, mask_kind, read_dseg_table
from spinedet.ingest.bids_import import bids_import, read_bids_cohort
from spinedet.io import read_csv

REPO = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))
CLASSES = ["disc_herniation", "cord_injury"]
LABEL_MAP = {"discherniation": "disc_herniation", "cordinjury": "cord_injury"}
# A sagittal stack: voxel (column A->P, row S->I, slice L->R), 1 x 1 mm in plane, 3 mm slices.
AFFINE = np.array([[0.0, 0.0, 3.0, -20.0], [-1.0, 0.0, 0.0, 40.0], [0.0, -1.0, 0.0, 30.0], [0, 0, 0, 1.0]])
SHAPE = (40, 48, 9)


def lesion_labels() -> np.ndarray:
    """Two herniations on slice 4 (one spans slices 4-5) and a cord injury on slice 6."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[10:14, 20:26, 4:6] = 1
    labels[30:33, 5:8, 4] = 1
    labels[18:22, 30:40, 6] = 2
    return labels


def save(image: nib.Nifti1Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.header.set_sform(image.affine, code=1)
    image.header.set_qform(image.affine, code=1)
    nib.save(image, path)
    return path


def make_dataset(root: Path, subjects: dict[str, str], *, mask_form: str = "dseg", table_at_root: bool = True,
                 image_affine: np.ndarray = AFFINE) -> Path:
    """A BIDS dataset: participants.tsv, one T2w per subject, lesion masks under derivatives/labels."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (root / "participants.tsv").write_text("participant_id\tgroup\tage\n"
                                           + "".join(f"sub-{s}\t{g}\t50\n" for s, g in subjects.items()))
    labels = lesion_labels()
    derivative = root / "derivatives" / "labels"
    for subject in subjects:
        rng = np.random.default_rng(len(subject))
        data = rng.integers(0, 1000, SHAPE).astype(np.int16)
        image = nib.Nifti1Image(data, image_affine)
        image.header["descrip"] = b"Patient Doe^Jane 1970"
        save(image, root / f"sub-{subject}" / "anat" / f"sub-{subject}_T2w.nii.gz")
        (root / f"sub-{subject}" / "anat" / f"sub-{subject}_T2w.json").write_text(
            json.dumps({"EchoTime": 0.1, "PatientName": "Doe^Jane", "InstitutionName": "General"}))
        anat = derivative / f"sub-{subject}" / "anat"
        if mask_form == "dseg":
            save(nib.Nifti1Image(labels, image_affine), anat / f"sub-{subject}_T2w_dseg.nii.gz")
        else:
            for index, name in ((1, "discherniation"), (2, "cordinjury")):
                save(nib.Nifti1Image((labels == index).astype(np.uint8), image_affine),
                     anat / f"sub-{subject}_T2w_label-{name}_mask.nii.gz")
    table = "index\tname\n1\tdischerniation\n2\tcordinjury\n"
    if mask_form == "dseg":
        if table_at_root:
            (derivative / "dseg.tsv").write_text(table)
        else:
            for subject in subjects:
                (derivative / f"sub-{subject}" / "anat" / f"sub-{subject}_T2w_dseg.tsv").write_text(table)
    return root


def config(**bids) -> dict:
    cfg = load([REPO / "config.yaml"])
    cfg["bids"] = {**cfg["bids"], **bids}
    return cfg


def run_import(root: Path, tmp_path: Path, cfg: dict | None = None, cohort: dict | None = None):
    cfg = cfg or config()
    cohort = cohort if cohort is not None else read_bids_cohort(root, None, cfg["bids"], cfg["groups"])
    out, restricted = tmp_path / "results" / "deid", tmp_path / "restricted"
    rows, summary = bids_import(root, cohort, KEY, cfg, out, restricted)
    return rows, summary, out


def boxes_by_patient(out: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in sorted(out.glob("sub-*/sub-*_boxes.json"))}


EXPECTED = sorted([
    ("disc_herniation", 4, (10, 20), (14, 26)), ("disc_herniation", 5, (10, 20), (14, 26)),
    ("disc_herniation", 4, (30, 5), (33, 8)), ("cord_injury", 6, (18, 30), (22, 40)),
])


def box_tuples(boxes: list[dict]) -> list[tuple]:
    return sorted((b["label"], b["slice"], tuple(b["min"]), tuple(b["max"])) for b in boxes)


def test_dseg_with_table_at_the_derivative_root_gives_one_box_per_component_and_slice(tmp_path):
    root = make_dataset(tmp_path / "bids", {"01": "disc", "02": "normal"})
    rows, summary, out = run_import(root, tmp_path)
    patients = boxes_by_patient(out)
    assert len(patients) == 2 and summary["boxes"] == 8
    for doc in patients.values():
        assert doc["slice_axis"] == 2  # the voxel axis along left-right in the affine
        assert box_tuples(doc["boxes"]) == EXPECTED
        assert all(b["axes"] == [0, 1] for b in doc["boxes"])
    assert {r["status"] for r in rows} <= {"used", "ignored"} and not summary["quarantined"]


def test_dseg_table_beside_the_mask_and_label_masks_give_the_same_boxes(tmp_path):
    beside = make_dataset(tmp_path / "beside", {"01": "disc"}, table_at_root=False)
    masks = make_dataset(tmp_path / "masks", {"01": "disc"}, mask_form="mask")
    _, _, out_beside = run_import(beside, tmp_path / "a")
    _, summary, out_masks = run_import(masks, tmp_path / "b")
    assert summary["masks_read"] == 2
    got = [box_tuples(doc["boxes"]) for doc in (*boxes_by_patient(out_beside).values(),
                                                 *boxes_by_patient(out_masks).values())]
    assert got == [EXPECTED, EXPECTED]


def world_boxes(doc: dict, affine: np.ndarray) -> list[tuple]:
    """Each box's label and the RAS extent of its voxel edges (rounded to 0.01 mm)."""
    found = []
    for box in doc["boxes"]:
        corners = []
        for a in (box["min"][0], box["max"][0]):
            for b in (box["min"][1], box["max"][1]):
                voxel = [0.0, 0.0, 0.0]
                voxel[doc["slice_axis"]] = box["slice"]
                voxel[box["axes"][0]], voxel[box["axes"][1]] = a - 0.5, b - 0.5
                corners.append(voxel)
        ras = voxel_to_ras(np.array(corners), affine)
        found.append((box["label"], tuple(np.round(ras.min(axis=0), 2)), tuple(np.round(ras.max(axis=0), 2))))
    return sorted(found)


def test_any_voxel_order_gives_the_same_boxes_in_the_patient(tmp_path):
    plain = make_dataset(tmp_path / "plain", {"01": "disc"})
    image = nib.load(plain / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    reoriented = nib.as_closest_canonical(image)
    assert not np.allclose(reoriented.affine, image.affine)
    other = make_dataset(tmp_path / "other", {"01": "disc"}, image_affine=reoriented.affine)
    # the same voxels in the reoriented order, and a mask likewise
    save(reoriented, other / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    labels = nib.Nifti1Image(lesion_labels(), AFFINE)
    save(nib.as_closest_canonical(labels),
         other / "derivatives" / "labels" / "sub-01" / "anat" / "sub-01_T2w_dseg.nii.gz")
    _, _, out_plain = run_import(plain, tmp_path / "a")
    _, summary, out_other = run_import(other, tmp_path / "b")
    assert summary["masks_resampled"] == 0
    (doc_plain,), (doc_other,) = boxes_by_patient(out_plain).values(), boxes_by_patient(out_other).values()
    assert doc_other["slice_axis"] == 0 != doc_plain["slice_axis"]
    assert world_boxes(doc_plain, AFFINE) == world_boxes(doc_other, reoriented.affine)


def test_a_mask_on_another_grid_is_resampled_with_nearest_neighbour(tmp_path):
    root = make_dataset(tmp_path / "bids", {"01": "disc"})
    # the lesions drawn on a grid of half the in-plane resolution (2 x 2 mm), offset by half a voxel
    coarse_affine = AFFINE.copy()
    coarse_affine[:3, :2] *= 2
    coarse_affine[:3, 3] += AFFINE[:3, :3] @ [0.5, 0.5, 0]
    coarse = np.zeros((20, 24, 9), dtype=np.uint8)
    coarse[5:7, 10:13, 4] = 1  # fine voxels 10..13 x 20..25 of slice 4
    mask = save(nib.Nifti1Image(coarse, coarse_affine),
                root / "derivatives" / "labels" / "sub-01" / "anat" / "sub-01_T2w_dseg.nii.gz")
    image = nib.load(root / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    boxes, issues, resampled = mask_boxes(mask, "dseg", "", image, root / "derivatives" / "labels", LABEL_MAP,
                                          CLASSES)
    assert resampled and not issues
    assert box_tuples(boxes) == [("disc_herniation", 4, (10, 20), (14, 26))]
    rows, summary, _ = run_import(root, tmp_path)
    assert summary["masks_resampled"] == 1
    assert any("resampled" in r["detail"] for r in rows if r["path"].endswith("_dseg.nii.gz"))


def test_an_unmapped_label_name_is_listed_with_its_reason(tmp_path):
    root = make_dataset(tmp_path / "bids", {"01": "disc"})
    (root / "derivatives" / "labels" / "dseg.tsv").write_text("index\tname\n1\tdischerniation\n2\tsyrinx\n")
    _, summary, out = run_import(root, tmp_path)
    issues = read_csv(out / "annotation_issues.csv")
    assert [(i["reason"], "syrinx" in i["detail"], "bids.label_map" in i["detail"]) for i in issues] == [
        ("unmapped_label", True, True)]
    assert issues[0]["pseudonym"] and issues[0]["pseudonym"] != "01"
    assert summary["label_issues"] == {"unmapped_label": 1}
    (doc,) = boxes_by_patient(out).values()
    assert {b["label"] for b in doc["boxes"]} == {"disc_herniation"}


def test_a_label_map_to_an_unknown_class_is_an_issue(tmp_path):
    root = make_dataset(tmp_path / "bids", {"01": "disc"}, mask_form="mask")
    _, _, out = run_import(root, tmp_path, config(label_map={"discherniation": "herniation",
                                                             "cordinjury": "cord_injury"}))
    assert [i["reason"] for i in read_csv(out / "annotation_issues.csv")] == ["unknown_label"]


def test_every_file_is_used_ignored_or_quarantined_with_a_reason(tmp_path):
    root = make_dataset(tmp_path / "bids", {"01": "disc", "02": "injured", "03": "normal"})
    # a T1w image, a second T2w session, a subject outside the cohort, a damaged image,
    # a mask naming no image, a dseg without its table, a stray file
    save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), AFFINE), root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    (root / "sub-01" / "anat" / "sub-01_T1w.json").write_text("{}")
    save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), AFFINE),
         root / "sub-01" / "anat" / "sub-01_acq-highres_T2w.nii.gz")
    save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), AFFINE), root / "sub-99" / "anat" / "sub-99_T2w.nii.gz")
    (root / "sub-03" / "anat" / "sub-03_T2w.nii.gz").write_bytes(b"not a nifti")
    save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), AFFINE),
         root / "derivatives" / "labels" / "sub-77" / "anat" / "sub-77_T2w_dseg.nii.gz")
    (root / "derivatives" / "labels" / "dseg.tsv").unlink()
    (root / "notes.txt").write_text("scanned on a Tuesday")
    # a sidecar that is not JSON
    (root / "sub-02" / "anat" / "sub-02_T2w.json").write_text("{not json")
    cfg = config()
    cohort = read_bids_cohort(root, None, cfg["bids"], cfg["groups"])
    rows, summary, out = run_import(root, tmp_path, cfg, cohort)
    by_path = {r["path"]: r for r in rows}
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert set(by_path) == files | {"sub-03/"}
    assert by_path["sub-03/"]["reason"] == "no_image" and by_path["sub-03/"]["subject"] == "03"
    assert by_path["sub-02/anat/sub-02_T2w.nii.gz"]["status"] == "used"
    assert by_path["sub-02/anat/sub-02_T2w.json"]["reason"] == "unreadable_sidecar"
    assert by_path["derivatives/labels/sub-02/anat/sub-02_T2w_dseg.nii.gz"]["subject"] == "02"
    assert all(r["status"] in ("used", "ignored", "quarantined") for r in rows)
    assert all(r["reason"] for r in rows if r["status"] == "quarantined")
    assert by_path["sub-01/anat/sub-01_T1w.nii.gz"]["reason"] == "not_target_image"
    assert by_path["sub-01/anat/sub-01_T1w.json"]["reason"] == "not_target_image"
    assert by_path["sub-01/anat/sub-01_acq-highres_T2w.nii.gz"]["reason"] == "second_image"
    assert by_path["sub-99/anat/sub-99_T2w.nii.gz"]["reason"] == "not_in_cohort"
    assert by_path["sub-03/anat/sub-03_T2w.nii.gz"]["reason"] == "unreadable_image"
    assert by_path["derivatives/labels/sub-77/anat/sub-77_T2w_dseg.nii.gz"]["reason"] == "orphan_mask"
    assert by_path["derivatives/labels/sub-01/anat/sub-01_T2w_dseg.nii.gz"]["reason"] == "no_dseg_table"
    assert by_path["notes.txt"]["reason"] == "not_bids"
    assert summary["patients_selected"] == 2 and summary["quarantined"] == 6  # 4 files, a sidecar, sub-03/
    assert summary["patients_without_target"] == 1
    assert {p["group"] for p in read_csv(out / "participants.csv")} == {"disc", "injured"}


def test_the_tree_is_pseudonymous_and_scrubbed(tmp_path):
    root = make_dataset(tmp_path / "bids", {"A0042": "disc"})
    _, _, out = run_import(root, tmp_path)
    (subject,) = [p.name for p in out.glob("sub-*")]
    assert "A0042" not in subject
    nifti = nib.load(out / subject / "anat" / f"{subject}_T2w.nii.gz")
    assert nifti.header["descrip"].item() == b""
    sidecar = json.loads((out / subject / "anat" / f"{subject}_T2w.json").read_text())
    assert sidecar["EchoTime"] == 0.1 and "PatientName" not in sidecar and "InstitutionName" not in sidecar
    assert "A0042" in (tmp_path / "restricted" / "pseudonyms.csv").read_text()
    for path in out.rglob("*"):
        if path.is_file():
            assert b"A0042" not in path.read_bytes() and b"Doe" not in path.read_bytes(), path


def test_the_cohort_comes_from_participants_tsv_or_cohort_csv(tmp_path):
    root = make_dataset(tmp_path / "bids", {"01": "disc", "02": "normal"})
    cfg = config()
    assert read_bids_cohort(root, None, cfg["bids"], cfg["groups"]) == {"01": "disc", "02": "normal"}
    cohort_csv = tmp_path / "cohort.csv"
    cohort_csv.write_text("patient_id,group\n02,injured\n")
    assert read_bids_cohort(root, cohort_csv, cfg["bids"], cfg["groups"]) == {"02": "injured"}
    with pytest.raises(SpinedetError, match="bids.group_column"):
        read_bids_cohort(root, None, {**cfg["bids"], "group_column": "diagnosis"}, cfg["groups"])
    (root / "participants.tsv").write_text("participant_id\tgroup\nsub-01\tunknown\n")
    with pytest.raises(SpinedetError, match="line 2"):
        read_bids_cohort(root, None, cfg["bids"], cfg["groups"])


def test_the_verb_writes_the_tables_and_a_phi_free_summary(tmp_path):
    root = make_dataset(tmp_path / "bids", {"A0042": "disc", "B0043": "normal"})
    key = tmp_path / "key"
    key.write_text(KEY.hex())
    args = ["bids-import", "--config", str(REPO / "config.yaml"),
            '{"raw_format": "bids", "annotations": null, "cohort": null, "demo": {"enabled": false}}',
            "--raw", str(root),
            "--restricted", str(tmp_path / "restricted"), "--key-file", str(key),
            "--files", str(tmp_path / "restricted" / "bids" / "files.csv"),
            "--summary", str(tmp_path / "results" / "inventory" / "summary.json"),
            "--out", str(tmp_path / "results" / "deid")]
    assert main(args) == 0
    summary = (tmp_path / "results" / "inventory" / "summary.json").read_text()
    assert json.loads(summary)["patients_selected"] == 2 and "A0042" not in summary
    assert len(read_csv(tmp_path / "restricted" / "bids" / "files.csv")) == 9


def test_mask_names_and_dseg_tables():
    image = Path("sub-01_ses-1_T2w.nii.gz")
    assert mask_kind(Path("sub-01_ses-1_T2w_label-cordinjury_mask.nii.gz"), image) == ("mask", "cordinjury")
    assert mask_kind(Path("sub-01_ses-1_T2w_desc-manual_dseg.nii.gz"), image) == ("dseg", "")
    assert mask_kind(Path("sub-01_ses-1_T2w_label-cord_desc-x_mask.nii"), image) == ("mask", "cord")
    assert mask_kind(Path("sub-02_ses-1_T2w_dseg.nii.gz"), image) is None
    assert mask_kind(Path("sub-01_ses-1_T2w.json"), image) is None


def test_read_dseg_table_names_its_problem(tmp_path):
    table = tmp_path / "dseg.tsv"
    table.write_text("index\tname\n1\tcord\n")
    assert read_dseg_table(table) == {1: "cord"}
    table.write_text("value,name\n1,cord\n")
    with pytest.raises(ValueError, match="index and name"):
        read_dseg_table(table)


def test_component_boxes_split_touching_structures_only_when_apart():
    structure = np.zeros((3, 10, 10), dtype=bool)
    structure[1, 2:4, 2:4] = True
    structure[1, 4:6, 4:6] = True  # touches the first diagonally: one 8-connected component
    structure[1, 8:9, 0:2] = True
    boxes = component_boxes(structure, slice_axis=0, label="x")
    assert sorted((tuple(b["min"]), tuple(b["max"])) for b in boxes) == [((2, 2), (6, 6)), ((8, 0), (9, 2))]


def test_issue_details_name_no_file_of_the_subject(tmp_path):
    """A damaged mask and a bad dseg table beside a mask: their issues (results/) never carry
    the file names, which carry the subject label."""
    root = make_dataset(tmp_path / "bids", {"A0042": "disc", "B0043": "disc"}, table_at_root=False)
    (root / "derivatives" / "labels" / "sub-A0042" / "anat" / "sub-A0042_T2w_dseg.nii.gz").write_bytes(b"damaged")
    (root / "derivatives" / "labels" / "sub-B0043" / "anat" / "sub-B0043_T2w_dseg.tsv").write_text("value\tname\n")
    rows, _, out = run_import(root, tmp_path)
    issues = read_csv(out / "annotation_issues.csv")
    assert sorted(i["reason"] for i in issues) == ["no_dseg_table", "unreadable_mask"]
    for path in out.rglob("*"):
        if path.is_file():
            assert b"A0042" not in path.read_bytes() and b"B0043" not in path.read_bytes(), path


def test_dseg_values_missing_from_the_table_are_listed(tmp_path):
    root = make_dataset(tmp_path / "bids", {"01": "disc"})
    (root / "derivatives" / "labels" / "dseg.tsv").write_text("index\tname\n1\tdischerniation\n")
    _, _, out = run_import(root, tmp_path)
    (issue,) = read_csv(out / "annotation_issues.csv")
    assert issue["reason"] == "unlisted_value" and "[2]" in issue["detail"]
    (doc,) = boxes_by_patient(out).values()
    assert {b["label"] for b in doc["boxes"]} == {"disc_herniation"}


def test_the_subjects_sagittal_image_is_chosen_over_an_axial_one(tmp_path):
    from spinedet.ingest.bids_import import find_images

    anat = tmp_path / "sub-05" / "anat"
    axial = save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.diag([1.0, 1.0, 4.0, 1.0])),
                 anat / "sub-05_acq-ax_T2w.nii.gz")
    sagittal = save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), AFFINE), anat / "sub-05_acq-sag_T2w.nii.gz")
    chosen, rows = find_images(tmp_path, sorted([axial, sagittal]), "T2w")
    assert chosen == {"05": sagittal}
    assert rows[axial]["reason"] == "not_sagittal" and "axial" in rows[axial]["detail"]
