"""Learning half of murmur: trainers, data, aggregators, privacy, rounds.

This package opens no sockets and must not import murmur.protocol.transport.
"""
