"""Project exceptions of the device runtime.

Every problem a user can cause (a corrupt bundle, a bad data file, a tampered payload) raises one of
these with a one-line message that names the thing and the fix; the CLI prints ``error: <message>``
and exits 2 instead of showing a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

    M = TypeVar("M", bound=BaseModel)


class DeftError(Exception):
    """Base class of every error the kit reports to a user in one line (device, edge, export, hardware):
    each CLI catches this one type, prints ``error: <message>`` and exits 2."""


def first_error(exc: ValidationError, root: str = "") -> tuple[str, str]:
    """Where and what the first problem of a pydantic ``ValidationError`` is, for a one-line message:
    ``("devices.0.flops", "Input should be greater than 0")``; ``root`` names a problem with no location."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or root
    return where, str(err.get("msg", "invalid")).removeprefix("Value error, ")


def validated(model: type[M], raw: Any, error: type[Exception], what: str) -> M:
    """``raw`` (a mapping, or JSON text) validated as ``model``; else ``error("<what> field <where>: <problem>")``,
    the one-line message of every structure a device or the edge receives (payload headers, prompt info)."""
    from pydantic import ValidationError

    try:
        return model.model_validate_json(raw) if isinstance(raw, str | bytes) else model.model_validate(raw)
    except ValidationError as exc:
        raise error("{} field {}: {}".format(what, *first_error(exc))) from None


def existing_file(path: str | Path, error: type[Exception], missing: str) -> Path:
    """``path`` as a Path when it is a file; else ``error(missing)`` with ``{path}`` filled in: the
    one-line "not found" of every file a user names (instances, fleet files)."""
    p = Path(path)
    if not p.is_file():
        raise error(missing.format(path=p))
    return p


class DeviceError(DeftError):
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
