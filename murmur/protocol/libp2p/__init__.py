"""A libp2p peer on asyncio, built from murmur's sans-IO pieces
(:mod:`~murmur.protocol.multistream`, :mod:`~murmur.protocol.noise_channel`,
:mod:`~murmur.protocol.yamux`, :mod:`~murmur.protocol.identify`)."""

from murmur.protocol.libp2p.connection import ConnectionClosed, Libp2pConnection, Stream, StreamResetError
from murmur.protocol.libp2p.host import HostConfig, Libp2pHost, echo_handler

__all__ = ["ConnectionClosed", "HostConfig", "Libp2pConnection", "Libp2pHost", "Stream", "StreamResetError",
           "echo_handler"]
