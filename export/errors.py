"""User-facing export errors: one line that names the problem and the fix."""

from device_runtime.errors import DeftError


class ExportError(DeftError):
    """Raised for bad input to the exporter. The CLI prints ``error: <message>`` and exits 2."""
