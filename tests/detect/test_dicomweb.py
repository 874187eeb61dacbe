"""`spinedet predict --dicomweb`: studies from a DICOMweb server, the SR stored back.

The round trip runs against a real Orthanc (Debian's orthanc + orthanc-dicomweb,
started by spinedet.detect.local_pacs on free ports in tmp_path); it is skipped,
saying so, only where Orthanc is not installed. The error paths run against a
port with nothing listening and a fake client.
"""

from __future__ import annotations

import csv
import json
import logging
import socket
import time
from pathlib import Path

import pydicom
import pytest
import requests
import yaml
from phi import collect_phi, scan_tree
from spinedet import SpinedetError
from spinedet.detect import dicomweb
from spinedet.detect.detection_sr import class_codes, read_detection_sr
from spinedet.detect.local_pacs import LocalOrthanc, orthanc_executable
from spinedet.ingest.dicom import list_files, read_file
from test_detection_sr import sparse_tiny_detector
from test_predict import CONFIG, META, ReplayModel

TOKEN = "s3cr3t-token-value-never-logged"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def smoke_studies(export: Path, count: int = 2) -> dict[str, list[Path]]:
    """StudyInstanceUID -> the readable files (images, SR, SEG) of the first `count` annotated patients."""
    with (export / "annotations.csv").open() as fh:
        annotated = list(dict.fromkeys(row["study_uid"] for row in csv.DictReader(fh)))[:count]
    studies = {uid: [] for uid in annotated}
    for path in list_files(export / "DICOM"):
        row = read_file(path)
        if row["status"] == "ok" and row.get("study_uid") in studies:
            studies[row["study_uid"]].append(path)
    return studies


# ---------------------------------------------------------------- the round trip through Orthanc


@pytest.fixture
def orthanc(tmp_path):
    if orthanc_executable() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb): the DICOMweb round "
                    "trip is not tested here")
    pacs = LocalOrthanc(tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port())
    with pacs:
        yield pacs
    assert not pacs.running


def test_round_trip_through_orthanc(orthanc, smoke_export, tmp_path, monkeypatch, caplog):
    from dicomweb_client.api import DICOMwebClient
    caplog.set_level(logging.DEBUG)  # everything `spinedet -v` logs, urllib3's request lines too
    from spinedet.cli import main
    from spinedet.detect import models
    from tiny_detector import save_best

    client = DICOMwebClient(orthanc.dicomweb_url)
    studies = smoke_studies(smoke_export)
    for uid, paths in studies.items():
        client.store_instances([pydicom.dcmread(path) for path in paths], study_instance_uid=uid)
    first, second = studies
    unknown = "1.2.826.0.1.3680043.8.498.999999999"

    monkeypatch.setitem(models.ARCHITECTURES, "tiny_test", sparse_tiny_detector)
    monkeypatch.setenv("SPINEDET_TEST_TOKEN", TOKEN)
    weights = save_best(tmp_path / "best.pt")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "train": {"threads": 1}}))
    (tmp_path / "studies.txt").write_text(f"# worklist\n{unknown}\n\n{second}\n")
    out = tmp_path / "predictions"
    argv = ["predict", "--config", str(config), "--weights", str(weights), "--dicomweb", orthanc.dicomweb_url,
            "--study-uid", first, "--studies", str(tmp_path / "studies.txt"), "--out", str(out), "--store",
            "--score-threshold", "0.1", "--sr-only", "--token-env", "SPINEDET_TEST_TOKEN", "-v"]
    caplog.clear()  # the test's own stores above are not predict's log
    assert main(argv) == 1  # the unknown study failed

    with (out / "predict_summary.csv").open() as fh:
        rows = {row["study_uid"]: row for row in csv.DictReader(fh)}
    assert list(rows) == [first, unknown, second]
    assert rows[unknown]["status"] == "failed" and rows[unknown]["reason"] == "study not found on the server"
    assert not rows[unknown]["folder"] and rows[unknown]["sr_stored"] == "no"
    codes = class_codes({})
    for uid in (first, second):
        row = rows[uid]
        assert row["status"] == "ok" and row["sr_stored"] == "yes" and row["sr"] == "detections_sr.dcm", row
        assert row["folder"] == dicomweb.study_folder(uid)
        result = json.loads((out / row["folder"] / "detections.json").read_text())
        assert int(row["detections"]) == len(result["detections"]) > 0
        # QIDO finds the SR in its study; WADO-RS gives it back; highdicom reads the detections
        series = client.search_for_series(study_instance_uid=uid, search_filters={"Modality": "SR"})
        ours = [s for s in series if s["0020000E"]["Value"][0] == result["dicom_sr"]["series_instance_uid"]]
        assert len(ours) == 1
        stored = client.retrieve_series(uid, result["dicom_sr"]["series_instance_uid"])
        assert [str(ds.SOPInstanceUID) for ds in stored] == [result["dicom_sr"]["sop_instance_uid"]]
        back = read_detection_sr(stored[0], codes)
        expected = [{"sop_instance_uid": det["dicom"]["sop_instance_uid"], "frame_number": det["dicom"]["frame_number"],
                     "x_min": det["dicom"]["x_min"], "y_min": det["dicom"]["y_min"], "x_max": det["dicom"]["x_max"],
                     "y_max": det["dicom"]["y_max"], "label": det["label"], "score": det["score"]}
                    for det in result["detections"]]
        def key(box):
            return box["sop_instance_uid"], box["x_min"], box["y_min"]

        assert len(back) == len(expected)
        for got, want in zip(sorted(back, key=key), sorted(expected, key=key)):
            assert got == {**want, **{k: pytest.approx(want[k], abs=1e-4)
                                      for k in ("x_min", "y_min", "x_max", "y_max", "score")}}
    # one folder per study that succeeded, nothing half-written
    assert sorted(p.name for p in out.iterdir()) == sorted(["predict_summary.csv", *(rows[u]["folder"]
                                                                                     for u in (first, second))])
    # no credential and no PHI in the log (studies are named by their folder, not their UID).
    # The log is what reaches the root logger, as the CLI's handler does: pytest also hooks its
    # capture onto loggers that do not propagate, which are the ones the CLI silences
    # (pydicom, highdicom, dicomweb_client: they never reach the CLI's log).
    silenced = ("pydicom", "highdicom", "dicomweb_client")
    logged = "\n".join(caplog.handler.format(record) for record in caplog.records
                       if not record.name.split(".")[0] in silenced)
    assert "spinedet.detect.dicomweb" in logged  # the log is there
    assert TOKEN not in logged
    assert not [uid for uid in (first, second) if uid in logged]
    for name in silenced:
        assert logging.getLogger(name).propagate is False
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "predict.log").write_text(logged)
    assert scan_tree(tmp_path / "log", collect_phi(smoke_export / "DICOM")) == []


# ---------------------------------------------------------------- error paths


def test_an_unreachable_server_is_one_clear_line_and_the_other_studies_are_not_tried(tmp_path):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    rows = dicomweb.predict_studies(CONFIG, None, f"http://127.0.0.1:{port}/dicom-web", ["1.2.3", "1.2.4"],
                                    tmp_path / "out", 0.5, store=True, model=ReplayModel({}), meta=META)
    assert time.monotonic() - started < 15
    assert rows[0]["status"] == "failed"
    assert rows[0]["reason"] == (f"DICOMweb server http://127.0.0.1:{port} unreachable (refused or unresolvable) "
                                 "while searching the study's series (QIDO-RS)")
    assert rows[1]["reason"] == f"not tried: {rows[0]['reason']}"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["predict_summary.csv"]


def test_credentials_come_from_named_environment_variables(monkeypatch):
    monkeypatch.setenv("PACS_TOKEN", TOKEN)
    session = dicomweb.session_from_environment("PACS_TOKEN", None, None)
    assert session.headers["Authorization"] == f"Bearer {TOKEN}"
    monkeypatch.setenv("PACS_USER", "reader")
    monkeypatch.setenv("PACS_PASSWORD", "pw")
    assert dicomweb.session_from_environment(None, "PACS_USER", "PACS_PASSWORD").auth == ("reader", "pw")
    monkeypatch.delenv("PACS_PASSWORD")
    with pytest.raises(SpinedetError, match="environment variable PACS_PASSWORD .* is not set") as error:
        dicomweb.session_from_environment(None, "PACS_USER", "PACS_PASSWORD")
    assert TOKEN not in str(error.value)
    with pytest.raises(SpinedetError, match="not both"):
        dicomweb.session_from_environment("PACS_TOKEN", "PACS_USER", "PACS_PASSWORD")
    with pytest.raises(SpinedetError, match="go together"):
        dicomweb.session_from_environment(None, "PACS_USER", None)
    assert dicomweb.server_name("https://user:pw@pacs.example:8443/dicom-web") == "https://pacs.example:8443"


def test_study_uids_from_flags_and_a_file(tmp_path):
    (tmp_path / "list.txt").write_text("1.2.3  # first\n\n# a comment\n1.2.4\n1.2.3\n")
    assert dicomweb.read_study_uids(["1.2.9"], tmp_path / "list.txt") == ["1.2.9", "1.2.3", "1.2.4"]
    with pytest.raises(SpinedetError, match="--study-uid UID"):
        dicomweb.read_study_uids([], None)
    with pytest.raises(SpinedetError, match="cannot read it"):
        dicomweb.read_study_uids([], tmp_path / "missing.txt")


def qido(uid: str, description: str, modality: str = "MR", n: int = 15) -> dict:
    return {"0020000E": {"vr": "UI", "Value": [uid]}, "0008103E": {"vr": "LO", "Value": [description]},
            "00080060": {"vr": "CS", "Value": [modality]}, "00201209": {"vr": "IS", "Value": [n]}}


def test_the_candidate_series_follow_the_inventory_rules():
    rules = CONFIG["inventory"]
    found = dicomweb.candidate_series([qido("1", "T2_TSE_SAG"), qido("2", "T1_SAG"), qido("3", "LOC"),
                                       qido("4", "lesions", "SR")], rules)
    assert [s["series_uid"] for s in found] == ["1"]
    assert [s["series_uid"] for s in dicomweb.candidate_series([qido("2", "T1_SAG")], rules)] == ["2"]  # the one
    with pytest.raises(SpinedetError, match=r"no target series: none of the study's 2 MR series .*'T1_SAG'"):
        dicomweb.candidate_series([qido("2", "T1_SAG"), qido("3", "LOC")], rules)
    with pytest.raises(SpinedetError, match=r"no target series: the study holds no MR series \(modalities: CT, SR\)"):
        dicomweb.candidate_series([qido("5", "x", "CT"), qido("6", "y", "SR")], rules)


class FakeClient:
    """A DICOMweb server in memory, from files; `store_instances` answers `stow_status`."""

    def __init__(self, paths: list[Path], stow_status: int | None = None):
        self.datasets = [pydicom.dcmread(path) for path in paths]
        self.stow_status = stow_status
        self.stored = []

    def search_for_series(self, study_instance_uid, fields=None, search_filters=None):
        series = {}
        for ds in self.datasets:
            if ds.StudyInstanceUID == study_instance_uid:
                series.setdefault(ds.SeriesInstanceUID, qido(ds.SeriesInstanceUID, ds.get("SeriesDescription", ""),
                                                             ds.Modality))
        return list(series.values())

    def retrieve_series(self, study_uid, series_uid):
        return [ds for ds in self.datasets if ds.SeriesInstanceUID == series_uid]

    def store_instances(self, datasets, study_instance_uid=None):
        if self.stow_status is not None:
            response = requests.Response()
            response.status_code = self.stow_status
            raise requests.exceptions.HTTPError(response=response)
        self.stored.extend(datasets)
        return pydicom.Dataset()


@pytest.fixture(scope="module")
def one_study(smoke_export):
    return next(iter(smoke_studies(smoke_export, 1).items()))


def test_a_rejected_stow_fails_the_study_but_keeps_its_prediction(one_study, tmp_path, monkeypatch):
    uid, paths = one_study
    client = FakeClient(paths, stow_status=409)
    monkeypatch.setattr(dicomweb, "connect", lambda url, session=None: client)
    model = ReplayModel({k: [([10.0, 10.0, 30.0, 30.0], 1)] for k in range(64)})
    rows = dicomweb.predict_studies(CONFIG, None, "http://pacs.invalid/dicom-web", [uid], tmp_path / "out", 0.5,
                                    store=True, model=model, meta=META, sr_only=True)
    assert rows[0]["status"] == "failed" and rows[0]["reason"] == "STOW-RS rejected the SR (HTTP 409)"
    assert rows[0]["sr_stored"] == "no" and rows[0]["sr"] == "detections_sr.dcm" and int(rows[0]["detections"]) > 0
    assert (tmp_path / "out" / dicomweb.study_folder(uid) / "detections_sr.dcm").is_file()


def test_a_failed_prediction_stores_nothing_and_leaves_nothing(one_study, tmp_path, monkeypatch):
    uid, paths = one_study
    client = FakeClient(paths)
    monkeypatch.setattr(dicomweb, "connect", lambda url, session=None: client)

    class Broken(ReplayModel):
        def __init__(self):
            super().__init__({})
            self.roi_heads = None  # fails inside predict, after the study was fetched

    out = tmp_path / "out"
    (out / dicomweb.study_folder(uid)).mkdir(parents=True)  # an earlier run's folder
    rows = dicomweb.predict_studies(CONFIG, None, "http://pacs.invalid/dicom-web", [uid, "not-a-uid"], out, 0.5,
                                    store=True, model=Broken(), meta=META)
    assert rows[0]["status"] == "failed" and rows[0]["reason"].startswith("unexpected error: ")
    assert rows[1]["reason"] == "not a DICOM UID (digits and dots, at most 64 characters)"
    assert client.stored == []
    assert [p.name for p in out.iterdir()] == ["predict_summary.csv"]


def test_the_stored_sr_goes_into_its_study(one_study, tmp_path, monkeypatch):
    uid, paths = one_study
    client = FakeClient(paths)
    monkeypatch.setattr(dicomweb, "connect", lambda url, session=None: client)
    model = ReplayModel({k: [([10.0, 10.0, 30.0, 30.0], 2)] for k in range(64)})
    rows = dicomweb.predict_studies(CONFIG, None, "http://pacs.invalid/dicom-web", [uid], tmp_path / "out", 0.5,
                                    store=True, model=model, meta=META, sr_only=True)
    assert rows[0]["status"] == "ok" and rows[0]["sr_stored"] == "yes"
    assert len(client.stored) == 1 and client.stored[0].StudyInstanceUID == uid
    assert client.stored[0].Modality == "SR"


def test_the_cli_refuses_dicomweb_flags_without_a_server(tmp_path, caplog):
    from spinedet.cli import main

    config = str(Path(__file__).resolve().parents[2] / "config.yaml")
    argv = ["predict", "--config", config, "--weights", "w.pt", "--input", str(tmp_path), "--out",
            str(tmp_path / "o"), "--study-uid", "1.2.3"]
    assert main(argv) == 2
    assert "--study-uid" in caplog.text and "--dicomweb" in caplog.text
    with pytest.raises(SystemExit):
        main(["predict", "--config", config, "--weights", "w.pt", "--input", str(tmp_path), "--dicomweb", "http://x/dicom-web",
              "--out", str(tmp_path / "o")])


def test_local_orthanc_ports_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPINEDET_ORTHANC_HTTP_PORT", "18111")
    monkeypatch.setenv("SPINEDET_ORTHANC_DICOM_PORT", "14111")
    pacs = LocalOrthanc(tmp_path)
    assert (pacs.http_port, pacs.dicom_port) == (18111, 14111)
    assert pacs.url == "http://127.0.0.1:18111" and pacs.dicomweb_url == "http://127.0.0.1:18111/dicom-web"
    assert LocalOrthanc(tmp_path, http_port=1234).url == "http://127.0.0.1:1234"
    monkeypatch.setenv("SPINEDET_ORTHANC_HTTP_PORT", "http")
    with pytest.raises(SpinedetError, match="is not a port number"):
        LocalOrthanc(tmp_path)


def test_a_credential_that_cannot_be_a_header_is_refused_naming_only_its_variable(monkeypatch):
    monkeypatch.setenv("SPINEDET_TEST_TOKEN", "tok3n-secret\nsecond-line")
    with pytest.raises(SpinedetError) as info:
        dicomweb.session_from_environment("SPINEDET_TEST_TOKEN", None, None)
    assert "SPINEDET_TEST_TOKEN" in str(info.value) and "tok3n" not in str(info.value)
