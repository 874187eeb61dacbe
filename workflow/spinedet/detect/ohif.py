"""The OHIF viewer beside a DICOMweb server, on this machine: the helpers of `spinedet view`.

- `prepare_ohif(cache)` fetches OHIF's built viewer (`npm pack @ohif/app@3.13.2`,
  its `package/dist/`), checks the tarball against its npm integrity hash,
  unpacks it into the cache and edits `app-config.js` (`configure`). It is
  idempotent: a prepared cache is used as it is.
- `ViewerServer` serves that `dist/` folder: a single-page app, so every path
  that is not a file falls back to `index.html`, and `/dicom-web/*` is forwarded
  to the DICOMweb server (passing `Accept`), because OHIF must reach DICOMweb on
  its own origin (Orthanc sends no CORS headers).
- `viewer_url` is the address of one study in it.

See ../shared/notes/ohif-viewer.md (the measured recipe) and README "Results
in your viewer".
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from spinedet import SpinedetError

log = logging.getLogger("spinedet.view")

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
# npm's `integrity` of @ohif/app-3.13.2.tgz (what `npm pack --json` and the registry report).
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
OHIF_TARBALL = f"ohif-app-{OHIF_VERSION}.tgz"
NPM_REGISTRY = "https://registry.npmjs.org"
CACHE_ENV = "SPINEDET_OHIF_CACHE"
ROUTER_BASENAME = "/ohif"
DICOMWEB_PATH = "/dicom-web"
PREPARED_MARKER = ".spinedet-prepared"
FETCH_TIMEOUT_S = 600
PROXY_TIMEOUT_S = 120
# Request headers passed on to the DICOMweb server; everything else stays here.
FORWARDED_REQUEST_HEADERS = ("Accept", "Range", "If-None-Match", "If-Modified-Since")
FORWARDED_RESPONSE_HEADERS = ("Content-Type", "Content-Length", "ETag", "Last-Modified", "Content-Range",
                              "Accept-Ranges")
MIME_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".wasm": "application/wasm", ".svg": "image/svg+xml",
    ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2", ".woff": "font/woff",
    ".xml": "application/xml", ".txt": "text/plain; charset=utf-8", ".map": "application/json",
}


class OhifUnavailable(SpinedetError):
    """OHIF's viewer could not be fetched or prepared (no npm and no registry, a bad tarball)."""


def default_cache() -> Path:
    """Where the viewer is kept: $SPINEDET_OHIF_CACHE, else build/ohif in a source
    checkout of spinedet, else ~/.cache/spinedet/ohif."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    checkout = Path(__file__).resolve().parents[3]
    if (checkout / "pyproject.toml").is_file() and (checkout / "workflow" / "spinedet").is_dir():
        return checkout / "build" / "ohif"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spinedet" / "ohif"


# --- app-config.js ---------------------------------------------------------------------------

# The data source roots become the page's own origin + /dicom-web (an expression:
# app-config.js is a script), so the viewer works under any host and port.
SAME_ORIGIN_DICOMWEB = f"window.location.origin + '{DICOMWEB_PATH}'"

# (what, pattern, replacement, expected count). Each must match exactly as often
# as it says, or the shipped config has changed shape and the edit is refused.
CONFIG_EDITS = (
    ("routerBasename", r"routerBasename:\s*(?:null|'[^']*'|\"[^\"]*\")",
     f"routerBasename: '{ROUTER_BASENAME}'", 1),
    ("wadoUriRoot", r"wadoUriRoot:\s*'[^']*'", f"wadoUriRoot: {SAME_ORIGIN_DICOMWEB}", 1),
    ("qidoRoot", r"qidoRoot:\s*'[^']*'", f"qidoRoot: {SAME_ORIGIN_DICOMWEB}", 1),
    ("wadoRoot", r"wadoRoot:\s*'[^']*'", f"wadoRoot: {SAME_ORIGIN_DICOMWEB}", 1),
    ("staticWado", r"staticWado:\s*(?:true|false)", "staticWado: false", 1),
    ("thumbnailRendering", r"thumbnailRendering:\s*'[^']*'", "thumbnailRendering: 'wadors'", 1),
)
CONFIG_HEADER = "// Edited by spinedet (spinedet.detect.ohif.configure): same-origin DICOMweb, router /ohif.\n"


def configure(text: str) -> str:
    """OHIF's shipped app-config.js edited for a local DICOMweb server behind the
    same origin: routerBasename '/ohif'; the `dicomweb` data source's wadoUriRoot,
    qidoRoot and wadoRoot at <origin>/dicom-web; staticWado false;
    thumbnailRendering 'wadors'. Already edited text comes back unchanged."""
    if text.startswith(CONFIG_HEADER):
        return text
    for what, pattern, replacement, expected in CONFIG_EDITS:
        text, count = re.subn(pattern, replacement, text)
        if count != expected:
            raise OhifUnavailable(f"OHIF's app-config.js has {count} '{what}' settings, {expected} expected: "
                                  f"its format changed (OHIF {OHIF_VERSION} is the version spinedet knows)")
    return CONFIG_HEADER + text


# --- fetching --------------------------------------------------------------------------------

def integrity_of(path: Path, algorithm: str = "sha512") -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{algorithm}-{base64.b64encode(digest.digest()).decode()}"


def _npm_pack(into: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise OhifUnavailable("npm is not installed")
    spec = f"{OHIF_PACKAGE}@{OHIF_VERSION}"
    log.info("fetching OHIF's viewer: npm pack %s (about 50 MB, once)", spec)
    try:
        subprocess.run([npm, "pack", spec, "--silent"], cwd=into, check=True, capture_output=True, text=True,
                       timeout=FETCH_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise OhifUnavailable(f"npm pack {spec} failed: {' / '.join(tail) or f'exit {exc.returncode}'}") from exc
    except subprocess.TimeoutExpired as exc:
        raise OhifUnavailable(f"npm pack {spec} did not finish within {FETCH_TIMEOUT_S} s") from exc
    tarball = into / OHIF_TARBALL
    if not tarball.is_file():
        raise OhifUnavailable(f"npm pack {spec} wrote no {OHIF_TARBALL}")
    return tarball


def _download(into: Path) -> Path:
    """The tarball straight from the npm registry (where there is no npm client)."""
    registry = (os.environ.get("npm_config_registry") or NPM_REGISTRY).rstrip("/")
    url = f"{registry}/{OHIF_PACKAGE}/-/app-{OHIF_VERSION}.tgz"
    log.info("fetching OHIF's viewer from %s (about 50 MB, once)", url)
    partial = into / (OHIF_TARBALL + ".part")
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise OhifUnavailable(f"cannot download {url}: {exc}") from exc
    return partial.replace(into / OHIF_TARBALL)


def fetch_tarball(cache: Path, integrity: str = OHIF_INTEGRITY) -> Path:
    """cache/ohif-app-<version>.tgz, fetched with npm pack (or from the registry
    without npm) unless it is there, and checked against `integrity`."""
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / OHIF_TARBALL
    if not tarball.is_file():
        try:
            tarball = _npm_pack(cache)
        except OhifUnavailable as npm_error:
            try:
                tarball = _download(cache)
            except OhifUnavailable as download_error:
                raise OhifUnavailable(f"{npm_error}; {download_error}") from download_error
    found = integrity_of(tarball, integrity.split("-", 1)[0])
    if found != integrity:
        tarball.unlink()
        raise OhifUnavailable(f"{OHIF_TARBALL} does not match its npm integrity hash ({found}, expected "
                              f"{integrity}): deleted, fetch it again")
    return tarball


def prepare_ohif(cache: Path | None = None, integrity: str = OHIF_INTEGRITY) -> Path:
    """OHIF's built viewer, ready to serve: the `dist/` folder under
    cache/ohif-app-<version>/ with app-config.js edited (`configure`). Fetched and
    unpacked once; a prepared cache is returned as it is."""
    cache = Path(cache) if cache is not None else default_cache()
    target = cache / f"ohif-app-{OHIF_VERSION}"
    dist = target / "dist"
    marker = target / PREPARED_MARKER
    if marker.is_file() and marker.read_text().strip() == integrity and (dist / "index.html").is_file():
        return dist
    tarball = fetch_tarball(cache, integrity)
    unpacking = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=cache))
    try:
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            if not members:
                raise OhifUnavailable(f"{OHIF_TARBALL} holds no package/dist/")
            archive.extractall(unpacking, members=members, filter="data")
        app_config = unpacking / "package" / "dist" / "app-config.js"
        if not app_config.is_file():
            raise OhifUnavailable(f"{OHIF_TARBALL} holds no dist/app-config.js")
        app_config.write_text(configure(app_config.read_text()))
        (unpacking / "package" / PREPARED_MARKER).write_text(integrity + "\n")
        if target.exists():
            shutil.rmtree(target)
        (unpacking / "package").replace(target)
    except tarfile.TarError as exc:
        raise OhifUnavailable(f"cannot unpack {tarball}: {exc}") from exc
    finally:
        shutil.rmtree(unpacking, ignore_errors=True)
    log.info("OHIF %s ready in %s", OHIF_VERSION, dist)
    return dist


# --- serving ---------------------------------------------------------------------------------

def viewer_url(base: str, study_uid: str, series_uid: str | None = None) -> str:
    """The viewer's address of one study (opened on `series_uid`, e.g. an SR series, when given)."""
    query = {"StudyInstanceUIDs": study_uid}
    if series_uid:
        query["initialSeriesInstanceUID"] = series_uid
    return f"{base.rstrip('/')}{ROUTER_BASENAME}/viewer?{urllib.parse.urlencode(query)}"


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._answer(head=False)

    def do_HEAD(self):
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == DICOMWEB_PATH or path.startswith(DICOMWEB_PATH + "/"):
            self._forward(head)
        else:
            self._static(path, head)

    def _static(self, path: str, head: bool) -> None:
        dist = self.server.dist
        relative = urllib.parse.unquote(path).lstrip("/")
        file = (dist / relative).resolve() if relative else dist / "index.html"
        if not file.is_relative_to(dist) or not file.is_file():
            file = dist / "index.html"  # the single-page app's routes (and anything unknown)
        body = b"" if head else file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", MIME_TYPES.get(file.suffix.lower(), "application/octet-stream"))
        self.send_header("Content-Length", str(file.stat().st_size))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, head: bool) -> None:
        upstream = self.server.upstream
        split = urllib.parse.urlsplit(self.path)
        target = upstream.path.rstrip("/") + split.path[len(DICOMWEB_PATH):]
        if split.query:
            target += f"?{split.query}"
        headers = {name: self.headers[name] for name in FORWARDED_REQUEST_HEADERS if self.headers[name]}
        headers.update(self.server.upstream_headers)
        connection_class = http.client.HTTPSConnection if upstream.scheme == "https" else http.client.HTTPConnection
        # hostname and port only: user information in the URL is no address (nor for the page)
        where = f"{upstream.hostname}:{upstream.port}" if upstream.port else str(upstream.hostname)
        connection = connection_class(where, timeout=PROXY_TIMEOUT_S)
        try:
            connection.request("HEAD" if head else "GET", target, headers=headers)
            response = connection.getresponse()
            body = response.read()
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # the type only: http.client quotes a rejected header's value, the credentials
            message = f"DICOMweb server {upstream.scheme}://{where} unreachable ({type(exc).__name__})".encode()
            self.send_response(502)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            self.wfile.write(message)
            return
        finally:
            connection.close()
        self.send_response(response.status)
        for name in FORWARDED_RESPONSE_HEADERS:
            if name != "Content-Length" and response.getheader(name):
                self.send_header(name, response.getheader(name))
        self.send_header("Content-Length", str(len(body)) if not head else response.getheader("Content-Length", "0"))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class ViewerServer(ThreadingHTTPServer):
    """Serves OHIF's `dist` (single-page app: unknown paths give index.html) and
    forwards /dicom-web/* to `dicomweb_url`. Port 0 picks a free port; `url` is
    where it answers. `upstream_headers` (e.g. Authorization) go with every
    forwarded request."""

    daemon_threads = True

    def __init__(self, dist: Path, dicomweb_url: str, host: str = "127.0.0.1", port: int = 0,
                 upstream_headers: dict[str, str] | None = None):
        self.dist = Path(dist).resolve()
        if not (self.dist / "index.html").is_file():
            raise SpinedetError(f"no index.html in {self.dist}: not OHIF's dist folder")
        self.upstream = urllib.parse.urlsplit(dicomweb_url)
        if self.upstream.scheme not in ("http", "https") or not self.upstream.netloc:
            raise SpinedetError(f"not an http(s) DICOMweb URL: {dicomweb_url}")
        self.upstream_headers = dict(upstream_headers or {})
        self._thread: threading.Thread | None = None
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise SpinedetError(f"cannot serve the viewer on {host}:{port}: {exc.strerror or exc}") from exc

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def start(self) -> ViewerServer:
        """Serve in a background thread (for tests); `shutdown()` + `server_close()` stop it."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="ohif-viewer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()
