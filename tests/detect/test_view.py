"""`spinedet view`'s parts without a browser: app-config.js edits, fetching and
unpacking the viewer (from a fake tarball), the single-page-app server with its
/dicom-web forwarding (to a fake DICOMweb server), and the verb's arguments."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from spinedet import SpinedetError
from spinedet.detect import ohif, view

# The parts of OHIF 3.13.2's dist/app-config.js that spinedet edits, as shipped.
SHIPPED_CONFIG = """window.config = {
  name: 'config/default.js',
  routerBasename: null,
  extensions: [],
  defaultDataSourceName: 'ohif',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'ohif',
      configuration: {
        friendlyName: 'AWS S3 Static wado server',
        wadoUriRoot: 'https://d14fa38qiwhyfd.cloudfront.net/dicomweb',
        qidoRoot: 'https://d14fa38qiwhyfd.cloudfront.net/dicomweb',
        wadoRoot: 'https://d14fa38qiwhyfd.cloudfront.net/dicomweb',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'thumbnail',
        staticWado: true,
      },
    },
  ],
};
"""


def test_configure_points_the_viewer_at_its_own_origin():
    edited = ohif.configure(SHIPPED_CONFIG)
    assert "routerBasename: '/ohif'" in edited
    for root in ("wadoUriRoot", "qidoRoot", "wadoRoot"):
        assert f"{root}: window.location.origin + '/dicom-web'" in edited
    assert "staticWado: false" in edited and "staticWado: true" not in edited
    assert "thumbnailRendering: 'wadors'" in edited
    assert "cloudfront" not in edited
    assert ohif.configure(edited) == edited  # idempotent


def test_configure_refuses_a_config_of_another_shape():
    with pytest.raises(ohif.OhifUnavailable, match="qidoRoot"):
        ohif.configure(SHIPPED_CONFIG.replace("qidoRoot", "qidoURL"))


def fake_tarball(path: Path, config: str = SHIPPED_CONFIG) -> str:
    """An npm tarball shaped like @ohif/app's (package/dist/...); its npm integrity."""
    files = {"package/package.json": b"{}", "package/dist/index.html": b"<html>ohif</html>",
             "package/dist/app-config.js": config.encode(), "package/dist/app.bundle.js": b"// js"}
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return ohif.integrity_of(path)


def test_prepare_unpacks_and_configures_once(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    integrity = fake_tarball(cache / ohif.OHIF_TARBALL)
    monkeypatch.setattr(ohif, "_npm_pack", lambda into: pytest.fail("the tarball is cached: no fetch"))
    dist = ohif.prepare_ohif(cache, integrity=integrity)
    assert dist == cache / f"ohif-app-{ohif.OHIF_VERSION}" / "dist"
    assert (dist / "index.html").read_text() == "<html>ohif</html>"
    assert "routerBasename: '/ohif'" in (dist / "app-config.js").read_text()
    assert not (dist.parent / "package.json").exists()  # only dist/ is unpacked
    (dist / "app-config.js").write_text("left alone")
    assert ohif.prepare_ohif(cache, integrity=integrity) == dist
    assert (dist / "app-config.js").read_text() == "left alone"  # prepared: not unpacked again
    assert not list(cache.glob(".unpacking-*"))


def test_a_tarball_that_does_not_match_its_integrity_is_deleted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    fake_tarball(cache / ohif.OHIF_TARBALL)
    with pytest.raises(ohif.OhifUnavailable, match="integrity"):
        ohif.prepare_ohif(cache, integrity="sha512-" + "A" * 86 + "==")
    assert not (cache / ohif.OHIF_TARBALL).exists()


def test_without_npm_nor_registry_the_viewer_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(ohif.shutil, "which", lambda name: None)
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(ohif.OhifUnavailable, match="npm is not installed.*cannot download"):
        ohif.prepare_ohif(tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


class FakeDicomweb(BaseHTTPRequestHandler):
    """Answers /dicom-web/... with what it was asked (path, Accept); 404 for /dicom-web/missing."""

    protocol_version = "HTTP/1.1"
    requests: list[dict] = []

    def log_message(self, *_args):
        pass

    def do_GET(self):
        FakeDicomweb.requests.append({"path": self.path, "accept": self.headers["Accept"],
                                      "cookie": self.headers["Cookie"]})
        status = 404 if "missing" in self.path else 200
        body = json.dumps({"path": self.path, "accept": self.headers["Accept"]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def dist(tmp_path) -> Path:
    folder = tmp_path / "dist"
    (folder / "assets").mkdir(parents=True)
    (folder / "index.html").write_text("<html>index</html>")
    (folder / "app-config.js").write_text("window.config = {};")
    (folder / "viewer.wasm").write_bytes(b"\0asm")
    (folder / "assets" / "logo.svg").write_text("<svg/>")
    (tmp_path / "secret.txt").write_text("outside dist")
    return folder


@pytest.fixture
def upstream():
    FakeDicomweb.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeDicomweb)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    server.shutdown()
    server.server_close()


def get(url: str, accept: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept, "Cookie": "c=1"} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def test_the_server_falls_back_to_index_html(dist, upstream):
    with ohif.ViewerServer(dist, upstream) as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, kind, body = get(server.url + "/ohif/viewer?StudyInstanceUIDs=1.2.3")
        assert (status, body) == (200, b"<html>index</html>") and kind.startswith("text/html")
        assert get(server.url + "/")[2] == b"<html>index</html>"
        assert get(server.url + "/app-config.js")[2] == b"window.config = {};"
        assert get(server.url + "/viewer.wasm")[1] == "application/wasm"
        assert get(server.url + "/assets/logo.svg")[1] == "image/svg+xml"
        assert get(server.url + "/../secret.txt")[2] == b"<html>index</html>"
        assert get(server.url + "/assets/%2e%2e/%2e%2e/secret.txt")[2] == b"<html>index</html>"


def test_dicom_web_is_forwarded_with_accept(dist, upstream):
    with ohif.ViewerServer(dist, upstream) as server:
        status, kind, body = get(server.url + "/dicom-web/studies?PatientID=7&limit=2",
                                 accept="application/dicom+json")
        assert status == 200 and kind == "application/dicom+json"
        assert json.loads(body) == {"path": "/dicom-web/studies?PatientID=7&limit=2",
                                    "accept": "application/dicom+json"}
        assert FakeDicomweb.requests[-1]["cookie"] is None  # only Accept (and friends) go on
        status, _, _ = get(server.url + "/dicom-web/studies/missing/series", accept="application/dicom+json")
        assert status == 404  # the server's answer, passed through


def test_an_unreachable_dicomweb_server_is_a_502(dist):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with ohif.ViewerServer(dist, f"http://127.0.0.1:{port}/dicom-web") as server:
        status, _, body = get(server.url + "/dicom-web/studies")
    assert status == 502 and b"unreachable" in body


def test_the_server_refuses_a_folder_without_index_html(tmp_path, upstream):
    with pytest.raises(SpinedetError, match="index.html"):
        ohif.ViewerServer(tmp_path, upstream)


def test_viewer_url_opens_the_study_on_its_sr():
    assert ohif.viewer_url("http://127.0.0.1:3000", "1.2", "1.2.3") == (
        "http://127.0.0.1:3000/ohif/viewer?StudyInstanceUIDs=1.2&initialSeriesInstanceUID=1.2.3")
    assert ohif.viewer_url("http://h:1/", "1.2") == "http://h:1/ohif/viewer?StudyInstanceUIDs=1.2"


def test_studies_to_open_prefer_the_sr_series():
    stored = [view.Stored("S1", "mr", "MR", Path("a")), view.Stored("S1", "sr", "SR", Path("b")),
              view.Stored("S2", "mr2", "MR", Path("c"))]
    assert view.studies_to_open(stored, ["S3", "S1"]) == {"S1": "sr", "S2": None, "S3": None}


def test_store_sends_dicom_files_in_batches_and_skips_the_rest(tmp_path, smoke_export):
    files = sorted((smoke_export / "DICOM").rglob("*"))
    folder = next(path for path in (smoke_export / "DICOM").iterdir() if path.is_dir())
    (tmp_path / "notes.txt").write_text("not DICOM")

    class Client:
        batches: list[int] = []

        def store_instances(self, datasets):
            self.batches.append(len(datasets))

    client = Client()
    stored = view.store(client, [folder, tmp_path / "notes.txt"])
    assert stored and sum(client.batches) == len(stored) and max(client.batches) <= view.STOW_BATCH
    assert len({s.study_uid for s in stored}) == 1 and files
    with pytest.raises(SpinedetError, match="no such file"):
        view.store(client, [tmp_path / "missing"])


def test_the_cli_knows_the_verb():
    from spinedet.cli import build_parser, main

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["view"]
    view.add_arguments(sub)
    args = parser.parse_args(["view", "study/", "out/detections_sr.dcm", "--port", "0"])
    assert args.paths == [Path("study/"), Path("out/detections_sr.dcm")]
    assert args.host == "127.0.0.1" and args.port == 0 and args.dicomweb is None
    with pytest.raises(SystemExit) as exit_info:
        main(["view", "--help"])
    assert exit_info.value.code == 0


def fake_prepared_cache(root: Path) -> Path:
    """A cache that prepare_ohif takes as prepared (marker + dist/index.html)."""
    target = root / f"ohif-app-{ohif.OHIF_VERSION}"
    (target / "dist").mkdir(parents=True)
    (target / "dist" / "index.html").write_text("<html>index</html>")
    (target / ohif.PREPARED_MARKER).write_text(ohif.OHIF_INTEGRITY + "\n")
    return root


def serve_and_stop(argv: list[str], tmp_path: Path) -> tuple[list[str], str]:
    """Run `spinedet view ARGV` until it prints its last line, fetch the viewer URL it prints,
    stop it with SIGTERM; (stdout lines, stderr)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "spinedet.cli", "view", "--port", "0",
               "--ohif-cache", str(fake_prepared_cache(tmp_path / "cache")), *argv]
    import threading

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # a child that never prints its last line is killed, so the read below ends (and fails)
    watchdog = threading.Timer(120, process.kill)
    watchdog.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append(line.strip())
            if line.startswith("Ctrl-C"):
                break
        assert lines and lines[-1].startswith("Ctrl-C"), process.stderr.read()
        viewer = next(line for line in lines if "/ohif/viewer?" in line)
        assert get(viewer)[2] == b"<html>index</html>"
    finally:
        watchdog.cancel()
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "stopped" in stderr
    return lines, stderr


def test_the_verb_serves_a_running_server_until_stopped(upstream, tmp_path):
    lines, _ = serve_and_stop(["--dicomweb", upstream, "--study-uid", "1.2.3"], tmp_path)
    assert lines[0].startswith("OHIF viewer at http://127.0.0.1:") and lines[0].endswith("/dicom-web")
    assert lines[1].endswith("/ohif/viewer?StudyInstanceUIDs=1.2.3")


def test_the_verb_stores_a_study_in_a_throw_away_orthanc(smoke_export, tmp_path, monkeypatch):
    from spinedet.detect.local_pacs import dicomweb_plugin, orthanc_executable

    if orthanc_executable() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    with socket.socket() as one, socket.socket() as two:
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        ports = one.getsockname()[1], two.getsockname()[1]
    monkeypatch.setenv("SPINEDET_ORTHANC_HTTP_PORT", str(ports[0]))
    monkeypatch.setenv("SPINEDET_ORTHANC_DICOM_PORT", str(ports[1]))
    folder = sorted(path for path in (smoke_export / "DICOM").iterdir() if path.is_dir())[0]
    study_uids = {s.study_uid for s in view.store(type("Client", (), {"store_instances": lambda *_: None})(),
                                                  [folder])}
    orthanc_dir = tmp_path / "orthanc"
    lines, stderr = serve_and_stop([str(folder), "--orthanc-dir", str(orthanc_dir)], tmp_path)
    assert [line.split("StudyInstanceUIDs=")[1] for line in lines if "StudyInstanceUIDs=" in line] == \
        sorted(study_uids)
    assert f"127.0.0.1:{ports[0]}/dicom-web" in lines[0]
    with pytest.raises(urllib.error.URLError):  # Orthanc stopped with the viewer
        urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/system", timeout=2)
    assert any((orthanc_dir / "storage").iterdir())  # --orthanc-dir keeps the storage
