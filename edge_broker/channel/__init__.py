"""The uplink channel the edge "hears" a round's updates through (DEFT technique 2: over-the-air aggregation).

``config.py`` says which channel and its parameters (:class:`ChannelConfig`); ``aircomp.py`` is the pure
maths of broadband analog aggregation (fading, truncated channel inversion, the receiver's estimate,
the closed-form MSE); ``digital.py`` the OFDMA baseline's and the air's latency; ``step.py`` plugs the
channel into a round (updates in, what the edge hears and a report out).
"""

from edge_broker.channel.config import ChannelConfig, ChannelError, ChannelKind

__all__ = ["ChannelConfig", "ChannelError", "ChannelKind"]
