"""`spinedet predict --dicomweb URL`: predict on studies of a DICOMweb server (a PACS),
and with --store send each study's SR back into it.

Per study (--study-uid, repeatable, or --studies FILE, one UID per line):
1. QIDO-RS: the study's series. None: "study not found".
2. The target series, chosen by the config's `inventory:` rules exactly as for a
   study folder: a study with one MR series gives that one; otherwise the MR
   series whose SeriesDescription meets the rules' description and exclusion
   patterns are retrieved, and predict's own selection (orientation, then
   `series_rank`) picks among their files. None: "no target series".
3. WADO-RS: those series' instances into a temporary folder (deleted after).
4. predict into --out/<folder>, where <folder> is `study-` + 12 hex digits of the
   SHA-256 of the StudyInstanceUID (predict_summary.csv maps it to the UID).
   The folder is written as a hidden `.partial` sibling and renamed when the
   prediction is complete: a failed study leaves no folder behind.
5. --store: STOW-RS of the SR into the same study (only after a prediction
   that succeeded, and only when it has an SR: one with no detection has none).

--out/predict_summary.csv has one row per study: study_uid, folder, status
(ok, failed), reason, detections, sr (the SR file, or empty), sr_stored (yes,
no, or empty without --store). A failed study is reported and the others go
on; the exit code is 1 if any failed. When the server cannot be reached, or
refuses the credentials, the remaining studies fail with the same reason
without being tried.

Credentials come from environment variables that flags name (--token-env:
a bearer token; --user-env and --password-env: HTTP basic). They are never
logged, written or put in a message, and dicomweb-client's own logger (which
logs request headers at debug level) is silenced. Log lines name studies by
their folder, not their UID.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import requests
from tqdm import tqdm

from spinedet import SpinedetError, silence_dicom_libraries
from spinedet.ingest.annotations.findings import exception_text

log = logging.getLogger(__name__)

SUMMARY = "predict_summary.csv"
SUMMARY_COLUMNS = ["study_uid", "folder", "status", "reason", "detections", "sr", "sr_stored"]
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
IMAGE_MODALITY = "MR"
TIMEOUT_S = 60
# Retry a busy server (429, 503, ...) a little; an unreachable one fails within about a second.
RETRY_ATTEMPTS = 3
RETRY_WAIT_MS = 250


class ServerError(SpinedetError):
    """The server cannot be used at all (unreachable, credentials refused): no other study is tried."""


def silence_client_logging() -> None:
    """dicomweb-client logs request URLs (study UIDs) and headers (credentials) at debug level;
    urllib3, under it, logs each request's URL at debug level (`spinedet -v`)."""
    client_log = logging.getLogger("dicomweb_client")
    client_log.propagate = False
    client_log.setLevel(logging.CRITICAL + 1)
    if not any(isinstance(h, logging.NullHandler) for h in client_log.handlers):
        client_log.addHandler(logging.NullHandler())
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def study_folder(study_uid: str) -> str:
    """The study's output folder name: no UID in a path that a log line names."""
    return "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def server_name(url: str) -> str:
    """scheme://host[:port] of the server, without user information or path."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def read_study_uids(given: list[str], studies_file: Path | None) -> list[str]:
    """--study-uid values then the lines of --studies (blank lines and # comments skipped), once each."""
    uids = [uid.strip() for uid in given or []]
    if studies_file is not None:
        try:
            text = Path(studies_file).read_text()
        except OSError as exc:
            raise SpinedetError(f"--studies {studies_file}: cannot read it ({exc.strerror})") from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                uids.append(line)
    uids = list(dict.fromkeys(uid for uid in uids if uid))
    if not uids:
        raise SpinedetError("--dicomweb needs the studies to predict on: --study-uid UID (repeatable) or "
                            "--studies FILE")
    return uids


def add_credential_arguments(group) -> None:
    """The flags naming the environment variables that hold the server's credentials
    (spinedet predict --dicomweb, spinedet view --dicomweb)."""
    group.add_argument("--token-env", metavar="NAME", default=None,
                       help="environment variable holding a bearer token for the server")
    group.add_argument("--user-env", metavar="NAME", default=None,
                       help="environment variable holding the user name (HTTP basic authentication)")
    group.add_argument("--password-env", metavar="NAME", default=None,
                       help="environment variable holding the password (HTTP basic authentication)")


def session_from_environment(token_env: str | None, user_env: str | None,
                             password_env: str | None) -> requests.Session:
    """A requests session with the credentials the named environment variables hold."""
    session = requests.Session()
    if token_env and (user_env or password_env):
        raise SpinedetError("give either --token-env or --user-env/--password-env, not both")
    if bool(user_env) != bool(password_env):
        raise SpinedetError("--user-env and --password-env go together")

    def value(name: str) -> str:
        found = (os.environ.get(name) or "").strip()
        if not found:
            raise SpinedetError(f"environment variable {name} (named by a credentials flag) is not set or empty")
        # a value that cannot go into an HTTP header would make requests quote it in an error
        if any(ord(character) < 0x21 or ord(character) == 0x7F for character in found):
            raise SpinedetError(f"environment variable {name} holds spaces or control characters (a line break?): "
                                "set it to the credential alone")
        return found

    if token_env:
        session.headers["Authorization"] = f"Bearer {value(token_env)}"
    elif user_env:
        session.auth = (value(user_env), value(password_env))
    return session


def connect(url: str, session: requests.Session | None = None):
    """A DICOMwebClient for `url` (its QIDO, WADO and STOW under the same root)."""
    from dicomweb_client.api import DICOMwebClient

    silence_client_logging()
    silence_dicom_libraries()
    if urlsplit(url).scheme not in ("http", "https"):
        raise SpinedetError(f"--dicomweb {server_name(url)}: not an http(s) URL")
    client = DICOMwebClient(url, session=session, timeout=TIMEOUT_S)
    client.set_http_retry_params(retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS)
    return client


def _http_failure(exc: Exception, server: str, doing: str) -> SpinedetError:
    """One line for a failed request: a ServerError when no other request can succeed either."""
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        what = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "refused or unresolvable"
        return ServerError(f"DICOMweb server {server} unreachable ({what}) while {doing}")
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    if code in (401, 403):
        return ServerError(f"DICOMweb server {server} refused the credentials (HTTP {code}) while {doing}: "
                           "check --token-env or --user-env/--password-env")
    if code is not None:
        return SpinedetError(f"DICOMweb server {server} answered HTTP {code} while {doing}")
    return SpinedetError(f"DICOMweb request failed while {doing} ({type(exc).__name__})")


def _element(item: dict, keyword: str) -> str:
    """A value of a DICOM JSON dataset (QIDO answer), by keyword; '' when absent."""
    from pydicom.datadict import tag_for_keyword

    element = item.get(f"{tag_for_keyword(keyword):08X}") or {}
    values = element.get("Value") or [""]
    return str(values[0]) if values[0] is not None else ""


def candidate_series(series: list[dict], rules: dict) -> list[dict]:
    """The MR series of a study that predict would consider, as dicts {series_uid, description,
    n}: the one MR series of a study that has one, else those whose description meets
    `inventory:` (description_pattern, exclude_pattern); orientation and ranking are left to
    predict's selection on the retrieved files. Raises SpinedetError when there are none."""
    found = [{"series_uid": _element(item, "SeriesInstanceUID"), "description": _element(item, "SeriesDescription"),
              "modality": _element(item, "Modality"), "n": _element(item, "NumberOfSeriesRelatedInstances")}
             for item in series]
    images = [s for s in found if s["modality"] == IMAGE_MODALITY and s["series_uid"]]
    if not images:
        modalities = ", ".join(sorted({s["modality"] or "?" for s in found}))
        raise SpinedetError(f"no target series: the study holds no MR series (modalities: {modalities})")
    if len(images) == 1:
        return images
    exclude = rules.get("exclude_pattern")
    chosen = [s for s in images if re.search(rules["description_pattern"], s["description"])
              and not (exclude and re.search(exclude, s["description"]))]
    if not chosen:
        listed = "; ".join(f"{s['description']!r} ({s['n'] or '?'} images)" for s in images)
        raise SpinedetError(f"no target series: none of the study's {len(images)} MR series meets the "
                            f"inventory rules ({listed})")
    return chosen


def fetch_study(client, study_uid: str, rules: dict, folder: Path, server: str) -> int:
    """QIDO the study's series, WADO-RS the candidate series into `folder` (one subfolder per
    series); the number of instances written."""
    try:
        series = client.search_for_series(
            study_instance_uid=study_uid,
            fields=["SeriesDescription", "Modality", "NumberOfSeriesRelatedInstances", "SeriesNumber"],
        )
    except requests.exceptions.HTTPError as exc:
        if getattr(exc.response, "status_code", None) == 404:
            raise SpinedetError("study not found on the server") from None
        raise _http_failure(exc, server, "searching the study's series (QIDO-RS)") from None
    except requests.exceptions.RequestException as exc:
        raise _http_failure(exc, server, "searching the study's series (QIDO-RS)") from None
    if not series:
        raise SpinedetError("study not found on the server")
    written = 0
    for number, chosen in enumerate(candidate_series(series, rules), start=1):
        try:
            datasets = client.retrieve_series(study_uid, chosen["series_uid"])
        except requests.exceptions.RequestException as exc:
            raise _http_failure(exc, server, "retrieving a series (WADO-RS)") from None
        target = folder / f"series-{number:03d}"
        target.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns with header values verbatim
            for index, dataset in enumerate(datasets, start=1):
                pydicom.dcmwrite(target / f"{index:05d}.dcm", dataset, enforce_file_format=True)
        written += len(datasets)
    if not written:
        raise SpinedetError("no target series: the server returned no instance of the study's MR series")
    return written


def store_sr(client, study_uid: str, sr_path: Path, server: str) -> None:
    """STOW-RS the SR into its study; SpinedetError when the server rejects it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = pydicom.dcmread(sr_path)
    try:
        response = client.store_instances([dataset], study_instance_uid=study_uid)
    except requests.exceptions.HTTPError as exc:
        code = getattr(exc.response, "status_code", "?")
        raise SpinedetError(f"STOW-RS rejected the SR (HTTP {code})") from None
    except requests.exceptions.RequestException as exc:
        raise _http_failure(exc, server, "storing the SR (STOW-RS)") from None
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reason = failed[0].get("FailureReason", "?")
        raise SpinedetError(f"STOW-RS rejected the SR (failure reason {reason})")


def predict_study(client, study_uid: str, out: Path, config: dict, weights: Path | None, threshold: float,
                  store: bool, server: str, **predict_options) -> dict:
    """One study: fetch, predict into out/<folder>, store. Its predict_summary.csv row;
    raises SpinedetError (the row is the caller's) when the prediction fails."""
    from spinedet.detect.predict import predict

    name = study_folder(study_uid)
    final, partial = out / name, out / f".{name}.partial"
    row = {"study_uid": study_uid, "folder": name, "status": "failed", "reason": "", "detections": "",
           "sr": "", "sr_stored": "no" if store else ""}
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if not UID_PATTERN.match(study_uid) or len(study_uid) > 64:
            raise SpinedetError("not a DICOM UID (digits and dots, at most 64 characters)")
        with tempfile.TemporaryDirectory(prefix="spinedet-dicomweb-") as tmp:
            fetch_study(client, study_uid, config["inventory"], Path(tmp) / "study", server)
            result = predict(config, weights, Path(tmp) / "study", partial, threshold, **predict_options)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # the folders under --out are this run's, as the summary says
        raise
    row.update(status="ok", detections=len(result["detections"]))
    if result.get("dicom_sr"):
        row["sr"] = result["dicom_sr"]["file"]
        if store:
            store_sr(client, study_uid, final / result["dicom_sr"]["file"], server)  # raises: the row is failed
            row["sr_stored"] = "yes"
    return row


def predict_studies(config: dict, weights: Path | None, url: str, study_uids: list[str], out: Path,
                    threshold: float, store: bool = False, session: requests.Session | None = None,
                    model=None, meta: dict | None = None, **predict_options) -> list[dict]:
    """Every study in turn (see the module docstring); the rows of predict_summary.csv, which is
    written to out/ (also when a study fails)."""
    from spinedet.detect.models import load_trained, resolve_device
    from spinedet.detect.predict import refuse_results_out
    from spinedet.io import write_csv

    out = Path(out)
    refuse_results_out(config, out)
    out.mkdir(parents=True, exist_ok=True)
    server = server_name(url)
    client = connect(url, session)
    if model is None:
        model, meta = load_trained(weights, resolve_device(config["train"]["device"]))
    rows, server_failure = [], None
    for study_uid in tqdm(study_uids, desc="studies", unit="study"):
        name = study_folder(study_uid)
        if server_failure is not None:
            rows.append({"study_uid": study_uid, "folder": name, "status": "failed",
                         "reason": f"not tried: {server_failure}", "detections": "", "sr": "",
                         "sr_stored": "no" if store else ""})
            continue
        try:
            row = predict_study(client, study_uid, out, config, weights, threshold, store, server,
                                model=model, meta=meta, **predict_options)
        except Exception as exc:  # noqa: BLE001 - a failed study is reported, the others go on
            if isinstance(exc, ServerError):
                server_failure = str(exc)
            if not isinstance(exc, SpinedetError):
                exc = SpinedetError(f"unexpected error: {exception_text(exc)}")
            stored = "no" if store else ""
            done = (out / name / "detections.json").is_file()  # predicted, the SR not stored
            row = {"study_uid": study_uid, "folder": name if done else "", "status": "failed",
                   "reason": str(exc), "detections": "", "sr": "", "sr_stored": stored}
            if done:
                from spinedet.io import read_json

                result = read_json(out / name / "detections.json")
                row["detections"] = len(result["detections"])
                row["sr"] = (result.get("dicom_sr") or {}).get("file", "")
        if row["status"] == "ok":
            log.info("%s: %s detections%s", name, row["detections"],
                     ", SR stored" if row["sr_stored"] == "yes" else "")
        else:
            log.error("%s: failed: %s", name, row["reason"])
        rows.append(row)
        write_csv(out / SUMMARY, rows, SUMMARY_COLUMNS)
    write_csv(out / SUMMARY, rows, SUMMARY_COLUMNS)
    return rows


def run(args: argparse.Namespace, config: dict, threshold: float, threshold_source: str,
        expected_model: str | None) -> int:
    """`spinedet predict --dicomweb`: 0 when every study succeeded, 1 otherwise."""
    if args.input is not None:
        raise SpinedetError("give --input or --dicomweb, not both")
    study_uids = read_study_uids(args.study_uid, args.studies)
    session = session_from_environment(args.token_env, args.user_env, args.password_env)
    rows = predict_studies(
        config, args.weights, args.dicomweb, study_uids, args.out, threshold, store=args.store, session=session,
        threads=args.threads, allow_non_sagittal=args.allow_non_sagittal, threshold_source=threshold_source,
        expected_model=expected_model, sr_only=args.sr_only,
    )
    failed = sum(row["status"] != "ok" for row in rows)
    log.info("%d of %d studies done, %d failed; see %s", len(rows) - failed, len(rows), failed,
             Path(args.out) / SUMMARY)
    return 1 if failed else 0
