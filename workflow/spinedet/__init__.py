"""spinedet: a reproducible cervical spine MRI detection study pipeline."""

__version__ = "0.1.0"


class SpinedetError(Exception):
    """An error a user can act on: printed as one line, without a traceback."""


def silence_dicom_libraries() -> None:
    """pydicom and highdicom log and warn with header values verbatim (a UID, a name):
    never into logs/, which sit outside restricted/. The values stay where
    they belong, in restricted/inventory/files.csv. Called by the CLI and by
    every worker process that reads or writes DICOM."""
    import logging
    import warnings

    # highdicom logs the UIDs of the datasets it copies attributes from (SR, SEG writing and reading)
    for name in ("pydicom", "highdicom"):
        library_log = logging.getLogger(name)
        library_log.propagate = False
        if not any(isinstance(h, logging.NullHandler) for h in library_log.handlers):
            library_log.addHandler(logging.NullHandler())
    warnings.filterwarnings("ignore", module=r"(pydicom|highdicom)(\.|$)")


def configure_logging(level: int) -> None:
    """The one log format of every verb, on stderr (the rule's log file); also
    the initializer of worker processes, whose records go to the same file."""
    import logging
    import sys

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    silence_dicom_libraries()
