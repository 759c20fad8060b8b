"""Aggregation: the shared pure maths, and one strategy per file chosen by name.

``aggregate.py`` holds the maths (deltas, sample weights, clipping, weighted mean, median, trimmed
mean); ``fedavg.py``, ``fedadam.py``, ``median.py``, ``trimmed_mean.py`` are the strategies built
on it. ``get_strategy("median", clip_norm=1.0).aggregate(global_tensors, updates)`` returns
``(new_tensors, report)``; every strategy takes ``clip_norm`` (per-update L2 clipping before
combining).
"""

from edge_broker.aggregation import fedadam, fedavg, median, trimmed_mean  # noqa: F401  (register)
from edge_broker.aggregation.base import Strategy, available, get_strategy, register
from edge_broker.aggregation.types import AggregationError, AggregationReport, ClientUpdate, Tensors

__all__ = ["AggregationError", "AggregationReport", "ClientUpdate", "Strategy", "Tensors", "available",
           "get_strategy", "register"]
