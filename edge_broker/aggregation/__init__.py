"""Aggregation strategies, one per file, chosen by name: fedavg, fedadam, median, trimmed_mean.

``get_strategy("median", clip_norm=1.0).aggregate(global_tensors, updates)``; every strategy takes
``clip_norm`` (per-update L2 clipping before combining).
"""

from edge_broker.aggregation import fedadam, fedavg, median, trimmed_mean  # noqa: F401  (register)
from edge_broker.aggregation.base import (
    AggregationError,
    AggregationReport,
    ClientUpdate,
    Strategy,
    Tensors,
    available,
    get_strategy,
    register,
)

__all__ = ["AggregationError", "AggregationReport", "ClientUpdate", "Strategy", "Tensors", "available",
           "get_strategy", "register"]
