"""Blocks of free TCP ports for a testnet's nodes.

Node listen ports must be known before any node starts (bootstrap addresses
name them), so port 0 will not do; another process may still take one in the
meantime, which then shows as a node failing to start. Used by the controller
on this machine and by each Ray host's agent on its own address.
"""

from __future__ import annotations

import random
import socket

PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range, where API ports (port 0) land
PORT_ATTEMPTS = 50


def find_free_port_block(count: int, rng: random.Random | None = None, host: str = "127.0.0.1") -> int:
    """A base port such that ``base .. base+count-1`` can all be bound on ``host`` now."""
    rng = rng or random.Random()
    for _ in range(PORT_ATTEMPTS):
        base = rng.randrange(PORT_RANGE[0], PORT_RANGE[1] - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {count} free ports on {host} in {PORT_RANGE}")
