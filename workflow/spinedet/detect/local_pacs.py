"""A throw-away local Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) with DICOMweb.

For tests, CI and `spinedet view`: a JSON config with its storage and index in
`workdir`, answering HTTP clients on this machine only (RemoteAccessAllowed
false: Orthanc cannot bind one address, it refuses other hosts), with no DICOM
(DIMSE) listener at all, the DICOMweb plugin under /dicom-web/. Ports come from SPINEDET_ORTHANC_HTTP_PORT (8042)
and SPINEDET_ORTHANC_DICOM_PORT (4242) unless given.

    with LocalOrthanc(tmp / "pacs") as pacs:
        client = DICOMwebClient(pacs.dicomweb_url)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from spinedet import SpinedetError

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN_PATHS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/plugins/libOrthancDicomWeb.so"),
)
HTTP_PORT_ENV = "SPINEDET_ORTHANC_HTTP_PORT"
DICOM_PORT_ENV = "SPINEDET_ORTHANC_DICOM_PORT"
DEFAULT_HTTP_PORT = 8042
DEFAULT_DICOM_PORT = 4242
LOG_TAIL_LINES = 20


def orthanc_executable() -> str | None:
    """Orthanc's executable (/usr/sbin/Orthanc or on PATH); None if not installed."""
    if ORTHANC.is_file() and os.access(ORTHANC, os.X_OK):
        return str(ORTHANC)
    return shutil.which("Orthanc")


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's shared library (Debian's orthanc-dicomweb); None if not installed."""
    return next((path for path in DICOMWEB_PLUGIN_PATHS if path.is_file()), None)


def _port(given: int | None, env: str, default: int) -> int:
    if given is not None:
        return int(given)
    value = os.environ.get(env, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise SpinedetError(f"{env}={value!r} is not a port number") from exc


class LocalOrthanc:
    """A local Orthanc with DICOMweb: a context manager (start() on enter, stop() on exit)."""

    def __init__(self, workdir: Path, http_port: int | None = None, dicom_port: int | None = None):
        self.workdir = Path(workdir)
        self.http_port = _port(http_port, HTTP_PORT_ENV, DEFAULT_HTTP_PORT)
        self.dicom_port = _port(dicom_port, DICOM_PORT_ENV, DEFAULT_DICOM_PORT)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self._process: subprocess.Popen | None = None
        self._log_handle = None

    def __enter__(self) -> LocalOrthanc:
        self.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def write_config(self) -> Path:
        plugin = dicomweb_plugin()
        if plugin is None:
            raise SpinedetError("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "spinedet-local",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "SPINEDET",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            # nothing uses DIMSE, and Orthanc would listen for it on every interface
            "DicomServerEnabled": False,
            "StableAge": 1,
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        return self.config_path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/system", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def start(self, timeout: float = 30) -> LocalOrthanc:
        """Start Orthanc and wait until GET /system answers."""
        if self._process is not None:
            return self
        executable = orthanc_executable()
        if executable is None:
            raise SpinedetError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.answers():
            raise SpinedetError(f"port {self.http_port} already answers as an HTTP server: set "
                                f"{HTTP_PORT_ENV} (and {DICOM_PORT_ENV}) to free ports")
        config = self.write_config()
        self._log_handle = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [executable, str(config)], stdout=self._log_handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise SpinedetError(f"Orthanc exited with code {code} at start; log tail:\n{self.log_tail()}")
            if self.answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise SpinedetError(f"Orthanc did not answer on {self.url}/system within {timeout:g} s; log tail:\n"
                            f"{self.log_tail()}")

    def stop(self, timeout: float = 15) -> None:
        """Terminate Orthanc and wait for it (kill if it does not stop within `timeout`)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None
