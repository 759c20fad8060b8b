"""Per-update L2 norm clipping, applied before any strategy (``clip_norm=`` on every strategy).

Why: it bounds what one device can move the global state by in a round, whatever strategy runs;
a scaled-up update (faulty or malicious) is cut to the same norm as an honest one.
"""

from edge_broker.aggregation.base import clip_deltas, global_norm

__all__ = ["clip_deltas", "global_norm"]
