"""murmur: a peer-to-peer node daemon for decentralized learning."""

__version__ = "0.1.0"
