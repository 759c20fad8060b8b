"""Project exceptions of the device runtime.

Every problem a user can cause (a corrupt bundle, a bad data file, a tampered payload) raises one of
these with a one-line message that names the thing and the fix; the CLI prints ``error: <message>``
and exits 2 instead of showing a traceback.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base class: a problem with the device's inputs, reported to the user in one line."""


class BundleError(DeviceError):
    """The bundle directory is missing, corrupt, or does not match its manifest."""


class DataError(DeviceError):
    """The local data file cannot be used (missing, wrong columns, no usable rows)."""


class PayloadError(DeviceError):
    """An update payload is truncated, tampered with, or not a deftkit payload."""


class StateError(DeviceError):
    """Tensors offered as global state do not match the bundle (names, shapes, dtypes, values)."""


class BackendUnavailable(DeviceError):
    """The requested training backend is not installed on this device."""
