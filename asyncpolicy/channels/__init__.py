"""Bounded, versioned channels between actors."""

from asyncpolicy.channels.versioned import (
    ChannelClosed,
    ChannelSnapshot,
    ChannelStatistics,
    EndOfStream,
    VersionedChannel,
    WouldBlock,
)

__all__ = ["ChannelClosed", "ChannelSnapshot", "ChannelStatistics", "EndOfStream", "VersionedChannel", "WouldBlock"]
