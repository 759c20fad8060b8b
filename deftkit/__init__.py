"""deftkit: device-edge fine-tuning of foundation models.

The kit is four import packages, one per part of the system:
``export`` (host), ``device_runtime`` (device, no torch), ``edge_broker`` (edge) and ``hardware``.
This small package only carries the version and the ``deft`` command-line entry point.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # the version is defined once, in pyproject.toml
    __version__ = version("deftkit")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
