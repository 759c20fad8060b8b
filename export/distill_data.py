"""Unlabelled text for emulator distillation: one sentence a line, or the text column of a TSV/CSV.

Distillation data is public text chosen by whoever exports the bundle, never a device's data; only
the text is read (labels, if any, are ignored), and its sha256 keys the distillation cache.
"""

from __future__ import annotations

import csv
import hashlib
import sys
from pathlib import Path

from export.errors import ExportError

_TEXT_COLUMNS = ("sentence", "text")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_texts(path: str | Path, text_column: str | None = None) -> list[str]:
    """The non-empty texts of ``path``: ``.tsv``/``.csv`` read the header's ``text_column`` (default
    ``sentence`` or ``text``); any other file is one text a line."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"distillation data {p} does not exist; give a text file (one sentence a line) or a TSV")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ExportError(f"distillation data {p} is not UTF-8 text") from None
    if p.suffix.lower() in (".tsv", ".csv"):
        texts = _column(p, raw, text_column)
    else:
        if text_column is not None:
            raise ExportError(f"--distill-text-column applies to .tsv/.csv files, not {p.name}")
        texts = [line.strip() for line in raw.splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise ExportError(f"distillation data {p} has no text; give one sentence a line or a TSV text column")
    return texts


def _column(p: Path, raw: str, text_column: str | None) -> list[str]:
    csv.field_size_limit(sys.maxsize)
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(raw.splitlines(), delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else
                            csv.QUOTE_MINIMAL)
    fields = reader.fieldnames or []
    col = text_column or next((c for c in _TEXT_COLUMNS if c in fields), None)
    if col is None or col not in fields:
        want = f"'{text_column}'" if text_column else " or ".join(f"'{c}'" for c in _TEXT_COLUMNS)
        raise ExportError(f"{p.name} has no {want} column (header: {fields}); name it with --distill-text-column")
    return [(row.get(col) or "").strip() for row in reader]
