"""User-facing export errors: one line that names the problem and the fix."""


class ExportError(Exception):
    """Raised for bad input to the exporter. The CLI prints ``error: <message>`` and exits 2."""
