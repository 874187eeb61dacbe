"""spinedet: a reproducible cervical spine MRI detection study pipeline."""

__version__ = "0.1.0"


class SpinedetError(Exception):
    """An error a user can act on: printed as one line, without a traceback."""
