"""Non-IID shards of a labelled TSV: each device gets its own rows with a skewed label mix.

Federated data is rarely identically distributed; the demo makes that visible by giving device i a
positive-label share that moves linearly from ``mean - skew`` to ``mean + skew`` across devices
(``mean`` is the file's own share, so the shards together use the rows without replacement).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from device_runtime.errors import DeftError


class ShardError(DeftError, ValueError):
    """The data cannot be split as asked (too few rows of a label)."""


def read_labelled_tsv(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def label_skewed_shards(rows: list[dict[str, str]], n_devices: int, rows_per_device: int, *, skew: float = 0.25,
                        label_column: str = "label", seed: int = 0) -> list[list[dict[str, str]]]:
    """``n_devices`` disjoint shards of ``rows_per_device`` rows, binary labels skewed per device."""
    if n_devices < 1 or rows_per_device < 1:
        raise ShardError("need at least one device and one row per device")
    rng = np.random.default_rng(seed)
    labels = sorted({r[label_column] for r in rows})
    if len(labels) != 2:
        raise ShardError(f"label skew needs exactly two labels, found {labels}")
    pools = {lab: [r for r in rows if r[label_column] == lab] for lab in labels}
    for pool in pools.values():
        rng.shuffle(pool)
    pos = labels[1]
    mean = len(pools[pos]) / len(rows)
    offsets = np.linspace(-skew, skew, n_devices) if n_devices > 1 else np.zeros(1)
    shares = np.clip(mean + offsets, 0.02, 0.98)
    shards: list[list[dict[str, str]]] = []
    taken = {lab: 0 for lab in labels}
    for share in shares:
        n_pos = int(round(share * rows_per_device))
        want = {pos: n_pos, labels[0]: rows_per_device - n_pos}
        shard = []
        for lab, n in want.items():
            if taken[lab] + n > len(pools[lab]):
                raise ShardError(f"not enough rows with label {lab!r} for {n_devices} shards of {rows_per_device} "
                                 f"rows (skew {skew}); use fewer rows per device or a smaller skew")
            shard += pools[lab][taken[lab]:taken[lab] + n]
            taken[lab] += n
        rng.shuffle(shard)
        shards.append(shard)
    return shards


def write_tsv(path: str | Path, fieldnames: list[str], rows: list[dict[str, str]]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\",
                           lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return p
