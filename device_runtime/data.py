"""Local data on the device: read TSV / CSV / JSONL / plain-text files, tokenize, batch, shuffle.

Rows that cannot be used (empty text, text longer than allowed, a label the bundle does not know,
a malformed JSON line) are skipped and counted, never fatal: a device's data is messy and one bad
row must not lose a training round. A file with *no* usable row, or without the columns we need, is
an error that names the file and the fix.

The batch order is a pure function of ``(seed, epoch, step)``, so a run resumed from a checkpoint
sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from device_runtime.bundle.manifest import Manifest
from device_runtime.errors import DataError

TEXT_COLUMNS = ("sentence", "text")
LABEL_COLUMNS = ("label", "labels")
IGNORE_INDEX = -100
#: rows longer than this many characters are skipped before tokenization (protects memory)
MAX_CHARS = 20_000

LongPolicy = Literal["truncate", "skip"]
PadPolicy = Literal["longest", "max_length"]


@dataclass
class Dataset:
    """Tokenized rows, padded to ``max_length``; ``lengths`` lets batches be trimmed to their longest row."""

    input_ids: np.ndarray  # int64 [N, max_length]
    attention_mask: np.ndarray  # int64 [N, max_length]
    labels: np.ndarray | None  # int64 [N] (seq-cls) or [N, max_length] (causal-lm); None if unlabelled
    lengths: np.ndarray  # int64 [N]
    texts: list[str]
    task: str
    source: str = ""
    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def skipped_rows(self) -> int:
        return int(sum(self.skipped.values()))

    def batch(self, indices: np.ndarray, pad_to: PadPolicy = "longest") -> dict[str, np.ndarray]:
        """Graph inputs for ``indices`` (``labels`` included when the data is labelled)."""
        idx = np.asarray(indices, dtype=np.int64)
        width = int(self.lengths[idx].max()) if pad_to == "longest" else self.input_ids.shape[1]
        out = {
            "input_ids": np.ascontiguousarray(self.input_ids[idx, :width]),
            "attention_mask": np.ascontiguousarray(self.attention_mask[idx, :width]),
        }
        if self.labels is not None:
            lab = self.labels[idx]
            out["labels"] = np.ascontiguousarray(lab if lab.ndim == 1 else lab[:, :width])
        return out

    def summary(self) -> dict:
        return {"source": self.source, "rows_read": self.rows_read, "rows_used": len(self),
                "skipped_rows": self.skipped_rows, "skipped": dict(self.skipped), "truncated": self.truncated}


# ----------------------------------------------------------------------------------------- reading


def _sniff_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".txt":
        return "txt"
    raise DataError(f"{path}: unknown data format {suffix!r}; use .tsv, .csv, .jsonl or .txt")


def read_rows(path: str | Path) -> tuple[list[str], list[dict | None]]:
    """Columns and rows of a data file (``None`` for a row that could not be parsed)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist; pass an existing .tsv/.csv/.jsonl/.txt file")
    fmt = _sniff_format(p)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None
    if fmt == "txt":
        return ["text"], [{"text": line} for line in text.splitlines()]
    if fmt == "jsonl":
        rows: list[dict | None] = []
        columns: dict[str, None] = {}
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                rows.append(None)
                continue
            if not isinstance(obj, dict):
                rows.append(None)
                continue
            columns.update(dict.fromkeys(obj))
            rows.append(obj)
        return list(columns), rows
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if fmt == "tsv" else ",",
                            quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
    columns = list(reader.fieldnames or [])
    return columns, [dict(r) for r in reader]


def _pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, path: Path,
                 option: str) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(f"{path}: no column {given!r} for the {what}; columns are {columns}")
        return given
    lower = {c.lower().strip(): c for c in columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise DataError(
        f"{path}: no {what} column (looked for {', '.join(repr(c) for c in candidates)}); columns are "
        f"{columns}; name it with {option}"
    )


def label_index(value: object, labels: list[str]) -> int | None:
    """A label given as a name (``positive``) or an index (``1``) -> index; None if unknown."""
    if isinstance(value, bool) or value is None:
        return None
    s = str(value).strip()
    if not s:
        return None
    if s in labels:
        return labels.index(s)
    lowered = [lab.lower() for lab in labels]
    if s.lower() in lowered:
        return lowered.index(s.lower())
    try:
        f = float(s)
    except ValueError:
        return None
    if not f.is_integer():
        return None
    i = int(f)
    if labels and not 0 <= i < len(labels):
        return None
    return i if i >= 0 else None


# ------------------------------------------------------------------------------------ tokenization


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` with padding off (we pad ourselves) and no truncation preset."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def load_dataset(
    path: str | Path,
    manifest: Manifest,
    tokenizer_path: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    max_length: int | None = None,
    labelled: bool = True,
    long_rows: LongPolicy = "truncate",
    limit: int | None = None,
) -> Dataset:
    """Read and tokenize a data file for ``manifest``'s task.

    ``labelled=False`` reads texts only (prediction). For a causal LM the text is its own label (pad
    positions ignored with -100), so no label column is needed. ``long_rows='skip'`` drops rows whose
    token count exceeds ``max_length`` instead of truncating them. ``limit`` keeps the first N usable rows.
    """
    p = Path(path)
    columns, rows = read_rows(p)
    causal = manifest.task == "causal-lm"
    tcol = _pick_column(columns, text_column, TEXT_COLUMNS if p.suffix != ".txt" else ("text",), "text", p,
                        "--text-column")
    need_label = labelled and not causal
    lcol = _pick_column(columns, label_column, LABEL_COLUMNS, "label", p, "--label-column") if need_label else None
    max_len = int(max_length or manifest.max_length)
    if max_len < 2:
        raise DataError(f"max_length {max_len} is too small; use at least 2")

    skipped: Counter = Counter()
    texts: list[str] = []
    labels: list[int] = []
    for row in rows:
        if row is None:
            skipped["malformed"] += 1
            continue
        raw = row.get(tcol)
        text = raw.strip() if isinstance(raw, str) else ("" if raw is None else str(raw).strip())
        if not text:
            skipped["empty"] += 1
            continue
        if len(text) > MAX_CHARS:
            skipped["too_long"] += 1
            continue
        if lcol is not None:
            li = label_index(row.get(lcol), manifest.labels)
            if li is None:
                skipped["unknown_label"] += 1
                continue
            labels.append(li)
        texts.append(text)

    tok = load_tokenizer(tokenizer_path)
    encodings = tok.encode_batch(texts) if texts else []
    keep: list[int] = []
    truncated = 0
    ids = np.full((len(texts), max_len), manifest.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(texts), max_len), dtype=np.int64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    n = 0
    for i, enc in enumerate(encodings):
        toks = enc.ids
        if len(toks) > max_len:
            if long_rows == "skip":
                skipped["too_long"] += 1
                continue
            truncated += 1
            toks = _truncate(toks, max_len, enc.special_tokens_mask)
        if not toks:
            skipped["empty"] += 1
            continue
        ids[n, : len(toks)] = toks
        mask[n, : len(toks)] = 1
        lengths[n] = len(toks)
        keep.append(i)
        n += 1
        if limit is not None and n >= limit:
            break
    ids, mask, lengths = ids[:n], mask[:n], lengths[:n]
    if n == 0:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "the file has no rows"
        raise DataError(f"{p}: no usable rows ({detail}); check the text/label columns and the label names "
                        f"{manifest.labels}")
    if causal:
        lab_arr: np.ndarray | None = np.where(mask == 1, ids, IGNORE_INDEX).astype(np.int64)
    elif lcol is not None:
        lab_arr = np.asarray([labels[i] for i in keep], dtype=np.int64)
    else:
        lab_arr = None
    return Dataset(input_ids=ids, attention_mask=mask, labels=lab_arr, lengths=lengths,
                   texts=[texts[i] for i in keep], task=manifest.task, source=str(p), rows_read=len(rows),
                   skipped=skipped, truncated=truncated)


def _truncate(ids: list[int], max_len: int, special: list[int]) -> list[int]:
    """Cut to ``max_len`` keeping a trailing special token (e.g. BERT's [SEP]) at the end."""
    if special and special[-1] == 1 and max_len >= 2:
        return list(ids[: max_len - 1]) + [ids[-1]]
    return list(ids[:max_len])


def tokenize_texts(texts: list[str], manifest: Manifest, tokenizer_path: str | Path,
                   max_length: int | None = None) -> Dataset:
    """Unlabelled dataset from in-memory texts (prediction); empty texts are kept as a lone pad token
    would be meaningless, so they raise instead."""
    max_len = int(max_length or manifest.max_length)
    tok = load_tokenizer(tokenizer_path)
    encs = tok.encode_batch(list(texts))
    ids = np.full((len(texts), max_len), manifest.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, enc in enumerate(encs):
        toks = enc.ids if len(enc.ids) <= max_len else _truncate(enc.ids, max_len, enc.special_tokens_mask)
        if not toks:
            raise DataError(f"text #{i} is empty after tokenization; remove it")
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1
        lengths[i] = len(toks)
    return Dataset(input_ids=ids, attention_mask=mask, labels=None, lengths=lengths, texts=list(texts),
                   task=manifest.task, source="<texts>", rows_read=len(texts))


# ------------------------------------------------------------------------------------- batch order


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return max(1, math.ceil(n_rows / batch_size))


def epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: depends only on (seed, epoch), so it can be recomputed on resume."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n_rows)


def batch_indices(n_rows: int, batch_size: int, seed: int, step: int, shuffle: bool = True) -> np.ndarray:
    """Rows of global step ``step`` (0-based); the last batch of an epoch may be smaller."""
    spe = steps_per_epoch(n_rows, batch_size)
    epoch, pos = divmod(int(step), spe)
    order = epoch_permutation(n_rows, seed, epoch) if shuffle else np.arange(n_rows)
    return order[pos * batch_size: (pos + 1) * batch_size]
