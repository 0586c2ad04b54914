"""murmur's libp2p stack on asyncio, built from its sans-IO pieces
(:mod:`~murmur.protocol.multistream`, :mod:`~murmur.protocol.noise`,
:mod:`~murmur.protocol.noise_channel`, :mod:`~murmur.protocol.framing`,
:mod:`~murmur.protocol.murmux`, :mod:`~murmur.protocol.yamux`,
:mod:`~murmur.protocol.identify`): the node's transport."""

from murmur.errors import ConnectionClosed
from murmur.protocol.libp2p.connection import (
    FastConnection,
    Libp2pConnection,
    Stream,
    StreamResetError,
    YamuxConnection,
)
from murmur.protocol.libp2p.host import HostConfig, Libp2pHost, echo_handler

__all__ = ["ConnectionClosed", "FastConnection", "HostConfig", "Libp2pConnection", "Libp2pHost", "Stream",
           "StreamResetError", "YamuxConnection", "echo_handler"]
