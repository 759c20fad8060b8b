"""Command-line choices from the one place each list is defined (a ``Literal`` or a tuple).

``typer`` offers and checks an ``Enum``'s values (``--encoding <fp32|fp16|int8|int8-row>``) and
refuses anything else with exit 2; :func:`choices` builds that enum from the list the code already
uses, so no CLI keeps its own copy or checks the string by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

try:
    from enum import StrEnum
except ImportError:  # Python 3.10 (JetPack 6): the same behaviour for typer's purposes

    class StrEnum(str, Enum):  # noqa: UP042
        def __str__(self) -> str:
            return str(self.value)


def choices(name: str, values: Iterable[str]) -> type[StrEnum]:
    """A ``StrEnum`` called ``name`` with one member per value (member name = value)."""
    return StrEnum(name, {v: v for v in values})
