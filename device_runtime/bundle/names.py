"""Names the exporter and the device share about a bundle's graphs.

The export wrappers hold the PEFT model as their attribute ``m``, so in the exported ONNX graphs and
``torch.export`` programs a trainable tensor named ``<name>`` in the manifest is the parameter
``m.<name>``. The exporters (``export/onnx_graph.py``, ``export/step_graph.py``) take it from here.
"""

from __future__ import annotations

#: attribute name (with its dot) of the wrapped model inside the export wrappers
WRAPPED_PREFIX = "m."


def wrapped_name(name: str) -> str:
    """The exported graph's name for the manifest tensor ``name``."""
    return WRAPPED_PREFIX + name


def manifest_name(wrapped: str) -> str:
    """The manifest's name for an exported graph's parameter ``wrapped`` (the inverse of :func:`wrapped_name`)."""
    return wrapped.removeprefix(WRAPPED_PREFIX)
