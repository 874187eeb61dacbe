"""The lesion annotations as DICOM objects: the TID 1500 SR gives back exactly the
boxes of annotations.csv, the SEG the phantom's masks on the right instances or
frames, both pass dciodvfy and are byte-reproducible, for classic and Enhanced MR."""

from __future__ import annotations

import csv
import datetime
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from spinedet.demo import annotation_objects as ao
from spinedet.demo.synthesize import synthesize
from spinedet.demo.truth import CaseTruth, load_truth

CODES = {
    "disc_herniation": ("SCT", "73589001", "Herniation of intervertebral disc"),
    "cord_injury": ("SCT", "90584004", "Injury of spinal cord"),
}
SEED = 8  # 3 patients at 64 px: one with boxes of both labels, one with three herniations, numbered against space
KINDS = ("classic", "enhanced")


@dataclass
class Target:
    """One patient's sagittal T2 as the demo wrote it, with its boxes and truth."""

    sources: list[pydicom.Dataset]
    boxes: list[dict]
    truth: CaseTruth

    @property
    def numbers(self) -> list[int]:
        """The instance (classic) or frame (enhanced) number of each source frame."""
        if "NumberOfFrames" in self.sources[0]:
            return list(range(1, int(self.sources[0].NumberOfFrames) + 1))
        return [int(ds.InstanceNumber) for ds in self.sources]

    @property
    def masks(self) -> dict[str, np.ndarray]:
        # truth.instance_numbers[k] is the instance (classic) or frame (enhanced)
        # number of spatial slice k; the sources are in that number's order.
        return ao.label_masks(self.truth.masks, self.truth.labels, np.argsort(self.truth.instance_numbers))

    def truth_masks(self) -> dict[str, np.ndarray]:
        """The same, straight from `CaseTruth.mask` (lesion, instance number)."""
        return {label: np.stack([np.any([self.truth.mask(lesion, number)
                                         for lesion, name in enumerate(self.truth.labels) if name == label], axis=0)
                                 for number in self.numbers])
                for label in dict.fromkeys(self.truth.labels)}


def read_targets(root: Path) -> list[Target]:
    """Every patient's target series, sources sorted by instance number."""
    with (root / "annotations.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    datasets = [pydicom.dcmread(path) for path in sorted((root / "DICOM").rglob("*")) if path.is_file()]
    targets = []
    for truth in load_truth(root).values():
        sources = sorted((ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid),
                         key=lambda ds: int(ds.InstanceNumber))
        boxes = [{"sop_instance_uid": row["sop_instance_uid"],
                  "frame_number": int(row["frame_number"]) if row["frame_number"] else None,
                  "label": row["label"],
                  **{key: int(row[key]) for key in ("x_min", "y_min", "x_max", "y_max")}}
                 for row in rows if row["series_uid"] == truth.series_uid]
        targets.append(Target(sources, boxes, truth))
    return targets


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("annotation_objects")
    synthesize(root / "classic", patients=3, matrix=64, seed=SEED)
    synthesize(root / "enhanced", patients=3, matrix=64, seed=SEED, enhanced_fraction=1.0)
    return {"classic": root / "classic", "enhanced": root / "enhanced"}


@pytest.fixture(scope="module")
def written(exports, tmp_path_factory) -> dict[str, list[tuple[Target, Path, Path]]]:
    """Per kind: (target, SR path, SEG path) of every patient with lesions."""
    out = tmp_path_factory.mktemp("annotation_objects_out")
    result = {}
    for kind, root in exports.items():
        result[kind] = []
        for target in read_targets(root):
            if not target.boxes:
                continue
            case = target.truth.case
            sr_path, seg_path = out / kind / f"{case}_sr.dcm", out / kind / f"{case}_seg.dcm"
            ao.write(ao.measurement_report(target.sources, target.boxes, CODES, series_number=90), sr_path)
            ao.write(ao.segmentation(target.sources, target.masks, CODES, series_number=91), seg_path)
            result[kind].append((target, sr_path, seg_path))
    return result


def test_the_exports_cover_both_kinds_and_both_labels(written):
    for kind in KINDS:
        targets = [target for target, _, _ in written[kind]]
        assert len(targets) == 2
        assert {label for target in targets for label in target.truth.labels} == set(CODES)
        assert any(len(set(target.truth.labels)) == 2 for target in targets)  # a two-segment SEG
        enhanced = [len(target.sources) == 1 and "NumberOfFrames" in target.sources[0] for target in targets]
        assert all(enhanced) if kind == "enhanced" else not any(enhanced)


# ------------------------------------------------------------------------- SR

def _coded(code: tuple[str, str, str]) -> hd.sr.CodedConcept:
    scheme, value, meaning = code
    return hd.sr.CodedConcept(value, scheme, meaning)


@pytest.mark.parametrize("kind", KINDS)
def test_the_sr_gives_back_exactly_the_boxes(written, kind):
    for target, sr_path, _ in written[kind]:
        sr = hd.sr.srread(sr_path)
        assert isinstance(sr, hd.sr.Comprehensive3DSR)
        groups = sr.content.get_planar_roi_measurement_groups()
        assert len(groups) == len(target.boxes)
        for number, (group, box) in enumerate(zip(groups, target.boxes), start=1):
            assert group.finding_type == _coded(CODES[box["label"]])
            assert group.tracking_identifier == f"lesion {number}"
            assert group.tracking_uid
            region = group.roi
            assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
            x0, y0, x1, y1 = box["x_min"], box["y_min"], box["x_max"], box["y_max"]
            np.testing.assert_array_equal(region.value, [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
            source = region.ContentSequence[0]
            assert source.referenced_sop_instance_uid == box["sop_instance_uid"]
            if kind == "enhanced":
                assert box["frame_number"] is not None
                assert source.referenced_frame_numbers == [box["frame_number"]]
                assert region.PixelOriginInterpretation == "FRAME"
            else:
                assert box["frame_number"] is None and source.referenced_frame_numbers is None
        assert len({group.tracking_uid for group in groups}) == len(groups)


@pytest.mark.parametrize("kind", KINDS)
def test_the_sr_header_comes_from_the_sources_and_names_the_procedure(written, kind):
    for target, sr_path, _ in written[kind]:
        sr = pydicom.dcmread(sr_path)
        first = target.sources[0]
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                        "AccessionNumber", "StudyDate", "StudyTime"):
            assert sr[keyword].value == first[keyword].value, keyword
        assert sr.SeriesInstanceUID != first.SeriesInstanceUID
        assert (sr.SeriesNumber, sr.SeriesDescription, sr.Manufacturer) == (90, ao.SR_DESCRIPTION, ao.MANUFACTURER)
        assert (sr.ContentDate, sr.ContentTime, sr.SeriesDate) == (first.StudyDate, first.StudyTime, first.StudyDate)
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}
        procedure = items["Procedure reported"].ConceptCodeSequence[0]
        assert (procedure.CodingSchemeDesignator, procedure.CodeValue) == ("LN", "24935-9")
        assert items["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
        assert items["Device Observer Name"].TextValue == "spinedet demo"
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == first.SeriesInstanceUID
        assert {item.ReferencedSOPInstanceUID for item in evidence.ReferencedSOPSequence} == \
            {ds.SOPInstanceUID for ds in target.sources}


# ------------------------------------------------------------------------ SEG

@pytest.mark.parametrize("kind", KINDS)
def test_the_seg_gives_back_the_masks_on_the_right_instances_or_frames(written, kind):
    for target, _, seg_path in written[kind]:
        seg = hd.seg.segread(seg_path)
        expected = {label: mask for label, mask in target.truth_masks().items() if mask.any()}
        assert {label: mask for label, mask in target.masks.items() if mask.any()}.keys() == expected.keys()
        for label, mask in expected.items():
            np.testing.assert_array_equal(target.masks[label], mask)
        assert seg.SegmentationType == "BINARY"
        assert [item.SegmentLabel for item in seg.SegmentSequence] == list(expected)
        for item in seg.SegmentSequence:
            assert item.SegmentAlgorithmType == "MANUAL"
            category = item.SegmentedPropertyCategoryCodeSequence[0]
            assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "49755003")
            prop = item.SegmentedPropertyTypeCodeSequence[0]
            assert (prop.CodingSchemeDesignator, prop.CodeValue, prop.CodeMeaning) == CODES[item.SegmentLabel]
        numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
        if kind == "enhanced":
            (source,) = target.sources
            frames = list(range(1, int(source.NumberOfFrames) + 1))
            pixels = seg.get_pixels_by_source_frame(source.SOPInstanceUID, source_frame_numbers=frames,
                                                    segment_numbers=numbers, assert_missing_frames_are_empty=True)
            referenced = {(ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber))
                          for frame in seg.PerFrameFunctionalGroupsSequence
                          for ref in frame.DerivationImageSequence[0].SourceImageSequence}
        else:
            uids = [ds.SOPInstanceUID for ds in target.sources]
            pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers,
                                                       assert_missing_frames_are_empty=True)
            referenced = {(ref.ReferencedSOPInstanceUID, None)
                          for frame in seg.PerFrameFunctionalGroupsSequence
                          for ref in frame.DerivationImageSequence[0].SourceImageSequence}
        for index, mask in enumerate(expected.values()):
            np.testing.assert_array_equal(pixels[..., index].astype(bool), mask)
        # empty frames are left out: one frame per (source frame, segment) with pixels
        assert int(seg.NumberOfFrames) == sum(int(m.any(axis=(1, 2)).sum()) for m in expected.values())
        holding = {k for m in expected.values() for k in np.flatnonzero(m.any(axis=(1, 2)))}
        if kind == "enhanced":
            assert referenced == {(source.SOPInstanceUID, k + 1) for k in holding}
        else:
            assert referenced == {(target.sources[k].SOPInstanceUID, None) for k in holding}


@pytest.mark.parametrize("kind", KINDS)
def test_seg_header_and_sr_boxes_agree_with_the_seg_masks(written, kind):
    """Each SR rectangle is the tight pixel-edge box of its lesion in the SEG: the
    coordinates need no half-pixel shift."""
    for target, sr_path, seg_path in written[kind]:
        seg = pydicom.dcmread(seg_path)
        first = target.sources[0]
        assert (seg.SeriesNumber, seg.SeriesDescription, seg.Manufacturer) == (91, ao.SEG_DESCRIPTION, ao.MANUFACTURER)
        assert (seg.StudyInstanceUID, seg.PatientID, seg.FrameOfReferenceUID) == \
            (first.StudyInstanceUID, first.PatientID, first.FrameOfReferenceUID)
        assert (seg.ContentDate, seg.ContentTime) == (first.StudyDate, first.StudyTime)
        masks = target.truth_masks()
        index = {(ds.SOPInstanceUID, None): k for k, ds in enumerate(target.sources)}
        if kind == "enhanced":
            index = {(first.SOPInstanceUID, k + 1): k for k in range(int(first.NumberOfFrames))}
        for group in hd.sr.srread(sr_path).content.get_planar_roi_measurement_groups():
            source = group.roi.ContentSequence[0]
            frames = source.referenced_frame_numbers
            k = index[(source.referenced_sop_instance_uid, frames[0] if frames else None)]
            label = next(name for name, code in CODES.items() if _coded(code) == group.finding_type)
            (x0, y0), (x1, y1) = group.roi.value[0].astype(int), group.roi.value[2].astype(int)
            inside = masks[label][k, y0:y1, x0:x1]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


# -------------------------------------------------------------- validity, bytes

@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("kind", KINDS)
def test_dciodvfy_finds_no_errors(written, kind):
    for _, sr_path, seg_path in written[kind]:
        for path, iod in ((sr_path, "Comprehensive3DSR"), (seg_path, "Segmentation")):
            result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            report = result.stdout + result.stderr
            assert [line for line in report.splitlines() if "Error" in line] == [], f"{path.name}: {report}"
            assert iod in report


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_inputs_give_the_same_bytes(exports, written, kind, tmp_path):
    for target, sr_path, seg_path in written[kind]:
        again = next(t for t in read_targets(exports[kind]) if t.truth.case == target.truth.case)
        ao.write(ao.measurement_report(again.sources, again.boxes, CODES, series_number=90), tmp_path / "sr.dcm")
        ao.write(ao.segmentation(again.sources, again.masks, CODES, series_number=91), tmp_path / "seg.dcm")
        assert (tmp_path / "sr.dcm").read_bytes() == sr_path.read_bytes()
        assert (tmp_path / "seg.dcm").read_bytes() == seg_path.read_bytes()
        assert sorted(path.name for path in tmp_path.iterdir()) == ["seg.dcm", "sr.dcm"]  # no temporary left


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_comes_from_the_clock(written, kind):
    today = datetime.date.today().strftime("%Y%m%d")
    for target, sr_path, seg_path in written[kind]:
        study_date = target.sources[0].StudyDate
        for path in (sr_path, seg_path):
            ds = pydicom.dcmread(path)
            assert path.read_bytes()[128:132] == b"DICM"
            dates = [str(element.value) for element in ds.iterall() if element.VR in ("DA", "DT")
                     and element.keyword != "PatientBirthDate" and element.value]
            assert dates and all(value.startswith(study_date) for value in dates), (path.name, dates)
            assert study_date != today


def test_uids_differ_between_objects_and_series_numbers(written):
    target = written["classic"][0][0]
    sr_a = ao.measurement_report(target.sources, target.boxes, CODES, series_number=90)
    sr_b = ao.measurement_report(target.sources, target.boxes, CODES, series_number=92)
    seg = ao.segmentation(target.sources, target.masks, CODES, series_number=90)
    uids = [sr_a.SeriesInstanceUID, sr_b.SeriesInstanceUID, seg.SeriesInstanceUID,
            sr_a.SOPInstanceUID, sr_b.SOPInstanceUID, seg.SOPInstanceUID]
    assert len(set(uids)) == len(uids)


# ---------------------------------------------------------------- bad inputs

def test_a_series_without_lesions_gets_neither_object(exports):
    normal = next(t for t in read_targets(exports["classic"]) if not t.truth.labels)
    empty = {label: np.zeros((len(normal.sources), 64, 64), dtype=bool) for label in CODES}
    with pytest.raises(ValueError, match="no mask holds any pixel"):
        ao.segmentation(normal.sources, empty, CODES, series_number=91)
    with pytest.raises(ValueError, match="no boxes"):
        ao.measurement_report(normal.sources, [], CODES, series_number=90)


def test_boxes_that_do_not_fit_their_source_are_refused(written):
    classic, enhanced = written["classic"][0][0], written["enhanced"][0][0]
    box = classic.boxes[0]
    cases = [
        (classic, {**box, "sop_instance_uid": "1.2.3"}, "not among the sources"),
        (classic, {**box, "frame_number": 1}, "single-frame source"),
        (classic, {**box, "x_max": 65}, "outside"),
        (classic, {**box, "x_max": box["x_min"]}, "empty"),
        (classic, {**box, "label": "fracture"}, "no code for label"),
        (enhanced, {**enhanced.boxes[0], "frame_number": None}, "multi-frame source"),
        (enhanced, {**enhanced.boxes[0], "frame_number": 99}, "multi-frame source"),
    ]
    for target, bad, message in cases:
        with pytest.raises(ValueError, match=message):
            ao.measurement_report(target.sources, [bad], CODES, series_number=90)


def test_masks_must_match_the_source_frames(written):
    target = written["enhanced"][0][0]
    label, mask = next((label, mask) for label, mask in target.masks.items() if mask.any())
    with pytest.raises(ValueError, match="shape"):
        ao.segmentation(target.sources, {label: mask[:-1]}, CODES, series_number=91)
