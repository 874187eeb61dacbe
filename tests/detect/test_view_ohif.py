"""predict's SR seen in a real viewer, in a real browser: a smoke patient's study and
the SR `predict --sr-only` writes for it go into a local Orthanc (STOW-RS), OHIF
(`npm pack @ohif/app`, served by spinedet.detect.ohif) opens the study in Debian's
headless Chromium driven by Playwright, and the page must show
- in the SR viewport, the image the SR's first finding lies on (its instance number);
- once the measurements are tracked, every finding in the measurement panel with its
  class (the finding type's code meaning, what OHIF labels a measurement with) and
  its instance.

The detections are the patient's annotated lesions, replayed through predict by a
stand-in detector (test_predict's ReplayModel): predict maps them back to DICOM and
writes the SR, as for a trained model. Screenshots go to $CI_DIR/ohif (build/ci/ohif
under CI, else tmp_path): a CI artifact. Skipped, saying so, only where Orthanc or
Chromium is missing or OHIF cannot be fetched (no npm and no registry).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from spinedet.detect import ohif
from spinedet.detect.detection_sr import class_codes, read_detection_sr
from spinedet.detect.local_pacs import LocalOrthanc, dicomweb_plugin, orthanc_executable
from spinedet.detect.predict import predict, read_series
from spinedet.detect.view import store, studies_to_open
from test_dicomweb import free_port
from test_predict import CLASSES, CONFIG, META, annotated_studies, replay_truth

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless Chromium with WebGL in software (../shared/notes/ohif-viewer.md).
CHROMIUM_ARGS = ["--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 1000}
LOAD_TIMEOUT_MS = 120_000
HYDRATE_TIMEOUT_S = 30
HYDRATE_PROMPT = "Do you want to continue tracking measurements for this study?"


def artifact_dir(tmp_path: Path) -> Path:
    """$CI_DIR/ohif; build/ci/ohif under CI (.ci/run's default CI_DIR); else tmp_path."""
    root = os.environ.get("CI_DIR") or ("build/ci" if os.environ.get("CI") else None)
    folder = (REPO / root / "ohif") if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def ohif_dist() -> Path:
    try:
        return ohif.prepare_ohif()
    except ohif.OhifUnavailable as exc:
        pytest.skip(f"OHIF's viewer cannot be fetched here ({exc}): the browser test does not run")


@pytest.fixture
def orthanc(tmp_path):
    if orthanc_executable() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc or its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb): "
                    "the OHIF test does not run")
    with LocalOrthanc(tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port()) as pacs:
        yield pacs


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the OHIF test does not run")
    return CHROMIUM


@pytest.fixture(scope="module")
def smoke_patient(smoke_export, tmp_path_factory):
    """An annotated smoke study, with both classes when one has them."""
    studies = annotated_studies(smoke_export, tmp_path_factory)
    return next((s for s in studies if {b.label for b in s.canonical} == set(CLASSES)), studies[0])


def predicted_sr(study, out: Path) -> tuple[dict, Path]:
    """predict --sr-only on the study, its lesions replayed as the detections: (detections.json, the SR)."""
    result = predict(CONFIG, None, study.folder, out, score_threshold=0.5, model=replay_truth(study.canonical),
                     meta=META, sr_only=True)
    assert result["detections"] and all(det["dicom"] for det in result["detections"])
    return result, out / "detections_sr.dcm"


def click(page, name: str) -> None:
    page.get_by_role("button", name=name, exact=True).click(timeout=LOAD_TIMEOUT_MS)


def test_ohif_draws_predicts_sr_on_the_referenced_image(smoke_patient, ohif_dist, orthanc, chromium, tmp_path):
    from dicomweb_client.api import DICOMwebClient
    from playwright.sync_api import sync_playwright

    result, sr_path = predicted_sr(smoke_patient, tmp_path / "prediction")
    codes = class_codes(CONFIG)
    findings = read_detection_sr(sr_path, codes)  # in the SR's order
    instance_of = {det["dicom"]["sop_instance_uid"]: det["dicom"]["instance_number"] for det in result["detections"]}
    first_instance = instance_of[findings[0]["sop_instance_uid"]]

    # The study as a PACS holds it (every series), and the SR beside it.
    _, target_files = read_series(smoke_patient.folder, CONFIG["inventory"])
    series_paths = sorted({Path(item["path"]) for item in target_files})
    study_paths = [smoke_patient.folder, sr_path]
    stored = store(DICOMwebClient(orthanc.dicomweb_url), study_paths)
    assert {p.resolve() for p in series_paths} <= {s.path.resolve() for s in stored}
    ((study_uid, sr_series_uid),) = studies_to_open(stored).items()
    assert sr_series_uid == result["dicom_sr"]["series_instance_uid"]

    shots = artifact_dir(tmp_path)
    with ohif.ViewerServer(ohif_dist, orthanc.dicomweb_url) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        console: list[str] = []  # OHIF's warnings and errors, for the failure message

        def note(message) -> None:
            if message.type in ("warning", "error") and message.text:
                console.append(message.text.splitlines()[0][:200])

        page.on("console", note)
        try:
            page.goto(ohif.viewer_url(server.url, study_uid, sr_series_uid))
            # First visit: the onboarding tour (its overlay takes every click) and the
            # investigational-use banner; OHIF remembers both in localStorage.
            click(page, "Skip all")
            click(page, "Confirm and hide")
            # The SR viewport sits on the image of the SR's first finding.
            bottom_right = page.locator('[data-cy="viewport-overlay-bottom-right"]')
            bottom_right.get_by_text(re.compile(rf"^I:\s*{first_instance}\b")).wait_for(timeout=LOAD_TIMEOUT_MS)
            assert page.locator('[data-cy^="ModalityLoadBadge"]').inner_text().strip() == "SR"
            page.screenshot(path=shots / "ohif_sr_viewport.png")

            # Tracking its measurements: the click on "Skip all" above also dismissed
            # OHIF's prompt to track them, so it is answered on a fresh load.
            page.reload()
            page.get_by_text(HYDRATE_PROMPT).wait_for(timeout=LOAD_TIMEOUT_MS)
            click(page, "Yes")
            page.locator('[data-cy="trackedMeasurements-btn"]').click(timeout=LOAD_TIMEOUT_MS)
            page.get_by_text(re.compile(r"^Measurements \(\d+\)")).wait_for(timeout=LOAD_TIMEOUT_MS)
            rows = page.locator('[data-cy^="measurement-table-row-"]')
            deadline = time.monotonic() + HYDRATE_TIMEOUT_S
            while rows.count() < len(findings) and time.monotonic() < deadline:
                page.wait_for_timeout(250)
            assert rows.count() == len(findings), (
                f"OHIF lists {rows.count()} of the SR's {len(findings)} findings after tracking; its console said: "
                f"{[line for line in dict.fromkeys(console) if 'tool state' in line or 'SR' in line][:3]}")
            listed = [(rows.nth(k).locator('[data-cy="data-row-title"]').inner_text().strip(),
                       rows.nth(k).locator('[data-cy="data-row-details-secondary"]').inner_text().strip())
                      for k in range(rows.count())]
            page.screenshot(path=shots / "ohif_sr_measurements.png")
        except Exception:
            page.screenshot(path=shots / "ohif_failure.png")
            (shots / "ohif_failure.txt").write_text(page.inner_text("body"))
            raise
        finally:
            browser.close()

    (shots / "ohif_measurements.json").write_text(json.dumps(listed, indent=1))
    # Each finding once, titled with its class's finding type, on its image.
    expected = Counter((codes[finding["label"]][2], instance_of[finding["sop_instance_uid"]]) for finding in findings)
    found = Counter((title, int(re.search(r"\bI:\s*(\d+)", details)[1])) for title, details in listed)
    assert found == expected, listed
