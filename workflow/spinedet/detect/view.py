"""`spinedet view`: look at a study and predict's SR in the OHIF viewer, in a browser on this machine.

Starts a throw-away local Orthanc (Debian's `orthanc` + `orthanc-dicomweb`;
storage in a temporary folder, or `--orthanc-dir`), or uses the DICOMweb
server `--dicomweb` names; stores the given DICOM files and folders in it with
STOW-RS (e.g. a study folder and predict's detections_sr.dcm); serves OHIF's
built viewer (fetched once with `npm pack @ohif/app`, see spinedet.detect.ohif)
on 127.0.0.1, with /dicom-web/ forwarded to the server; prints the viewer URL
of each study (opened on its SR series, if one was stored) and serves until
Ctrl-C, which also stops the throw-away Orthanc.

    spinedet view path/to/study_folder predictions/detections_sr.dcm

The studies stay on the machine: nothing listens beyond 127.0.0.1 unless
--host says so (reach a remote machine's viewer through `ssh -L`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from spinedet import SpinedetError
from spinedet.detect import ohif
from spinedet.detect.dicomweb import add_credential_arguments
from spinedet.detect.local_pacs import LocalOrthanc

log = logging.getLogger("spinedet.view")

DEFAULT_PORT = 3000
STOW_BATCH = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                        help="DICOM files or folders to store first (a study folder, predict's detections_sr.dcm); "
                             "files that are not DICOM are skipped")
    parser.add_argument("--dicomweb", metavar="URL",
                        help="a running DICOMweb server (e.g. http://127.0.0.1:8042/dicom-web) to view and store "
                             "into, instead of a throw-away local Orthanc")
    parser.add_argument("--study-uid", action="append", default=[], metavar="UID",
                        help="also print the viewer URL of this study, already on the server (repeatable)")
    parser.add_argument("--orthanc-dir", type=Path, default=None,
                        help="keep the local Orthanc's storage here, so the studies are still there next time "
                             "(default: a temporary folder, deleted on exit); its ports come from "
                             "SPINEDET_ORTHANC_HTTP_PORT (8042) and SPINEDET_ORTHANC_DICOM_PORT (4242)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the viewer listens on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port of the viewer (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--ohif-cache", type=Path, default=None,
                        help="where OHIF's viewer is fetched and unpacked once (default $SPINEDET_OHIF_CACHE, "
                             "else build/ohif in a source checkout, else ~/.cache/spinedet/ohif)")
    web = parser.add_argument_group("credentials for --dicomweb (as spinedet predict --dicomweb)")
    add_credential_arguments(web)


@dataclass(frozen=True)
class Stored:
    """One instance stored on the server."""

    study_uid: str
    series_uid: str
    modality: str
    path: Path


def dicom_datasets(paths: list[Path]):
    """(path, dataset) of every DICOM file given or under a given folder, in order;
    logs how many files were not DICOM. Raises SpinedetError for a path that is not there."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from spinedet.ingest.dicom import list_files

    skipped = 0
    for path in paths:
        if path.is_dir():
            files = list_files(path)
        elif path.is_file():
            files = [path]
        else:
            raise SpinedetError(f"no such file or folder: {path}")
        for file in files:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # pydicom warns with header values verbatim
                    dataset = pydicom.dcmread(file)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                skipped += 1
                continue
            if "SOPInstanceUID" not in dataset or "StudyInstanceUID" not in dataset:
                skipped += 1
                continue
            yield file, dataset
    if skipped:
        log.info("skipped %d file(s) that are not DICOM instances", skipped)


def store(client, paths: list[Path]) -> list[Stored]:
    """Store every DICOM file of `paths` with STOW-RS through a dicomweb_client
    client, in batches; what was stored. A rejected batch is a SpinedetError."""
    from requests.exceptions import HTTPError, RequestException

    stored: list[Stored] = []
    batch: list[tuple[Path, object]] = []

    def send() -> None:
        try:
            client.store_instances([dataset for _, dataset in batch])
        except HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise SpinedetError(f"the DICOMweb server rejected the instances of {batch[0][0]} ... (HTTP {status})") \
                from exc
        except RequestException as exc:
            # the type only: a request error can quote the URL and the headers (credentials)
            raise SpinedetError(f"DICOMweb server unreachable while storing ({type(exc).__name__})") from None
        stored.extend(Stored(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.get("Modality", "")), path)
                      for path, ds in batch)
        batch.clear()

    for path, dataset in dicom_datasets(paths):
        batch.append((path, dataset))
        if len(batch) >= STOW_BATCH:
            send()
    if batch:
        send()
    return stored


def studies_to_open(stored: list[Stored], study_uids: list[str] = ()) -> dict[str, str | None]:
    """{study UID: the series to open it on (its last stored SR series) or None}, in the order first seen."""
    studies: dict[str, str | None] = {}
    for item in stored:
        studies.setdefault(item.study_uid, None)
        if item.modality == "SR":
            studies[item.study_uid] = item.series_uid
    for uid in study_uids:
        studies.setdefault(uid, None)
    return studies


def upstream_headers(session) -> dict[str, str]:
    """The Authorization header a requests session (dicomweb.session_from_environment) sends:
    the viewer's /dicom-web/ forwarding sends it too."""
    from requests.auth import _basic_auth_str

    if session.auth:
        return {"Authorization": _basic_auth_str(*session.auth)}
    if session.headers.get("Authorization"):
        return {"Authorization": session.headers["Authorization"]}
    return {}


def run(args: argparse.Namespace) -> int:
    from spinedet.detect import dicomweb

    credentials = (args.token_env, args.user_env, args.password_env)
    if any(credentials) and not args.dicomweb:
        raise SpinedetError("--token-env, --user-env and --password-env are for a server given with --dicomweb")
    session = dicomweb.session_from_environment(*credentials)
    dist = ohif.prepare_ohif(args.ohif_cache)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl-C does: Orthanc too
    try:
        with contextlib.ExitStack() as stack:
            if args.dicomweb:
                dicomweb_url = args.dicomweb.rstrip("/")
            else:
                workdir = args.orthanc_dir or Path(
                    stack.enter_context(tempfile.TemporaryDirectory(prefix="spinedet-view-")))
                pacs = stack.enter_context(LocalOrthanc(workdir))
                dicomweb_url = pacs.dicomweb_url
                log.info("local Orthanc at %s (Orthanc Explorer: %s/app/explorer.html)", pacs.url, pacs.url)
            stored = store(dicomweb.connect(dicomweb_url, session), list(args.paths)) if args.paths else []
            if stored:
                log.info("stored %d instance(s) of %d series in %d study(ies)", len(stored),
                         len({s.series_uid for s in stored}), len({s.study_uid for s in stored}))
            if args.host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("the viewer listens on %s: anyone who reaches it reads the studies%s", args.host,
                            ", with this server's credentials" if any(credentials) else "")
            server = ohif.ViewerServer(dist, dicomweb_url, host=args.host, port=args.port,
                                       upstream_headers=upstream_headers(session))
            stack.callback(server.server_close)
            print(f"OHIF viewer at {server.url}{ohif.ROUTER_BASENAME}/ (study list), DICOMweb at "
                  f"{dicomweb.server_name(dicomweb_url)}{urlsplit(dicomweb_url).path}")
            for study_uid, series_uid in studies_to_open(stored, args.study_uid).items():
                print(ohif.viewer_url(server.url, study_uid, series_uid))
            print("Ctrl-C stops the viewer" + ("" if args.dicomweb else " and the local Orthanc"), flush=True)
            server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt
