"""A module the fork-server tests fork: ``main(args)`` does what ``args[0]`` names.

Real behaviours of a worker, one each: print and exit with a code, sleep,
stop gracefully on SIGTERM, count SIGTERMs, ignore SIGTERM, raise.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence

FORK_PRELOAD = ("json",)  # the server imports these too: exercised, and cheap
SLEEP_S = 60.0
COUNT_TERMS_LINGER_S = 0.5


def main(args: Sequence[str]) -> int:
    mode, rest = args[0], list(args[1:])
    if mode == "exit":  # print to both streams, then leave with the given code
        print("to-stdout", *rest[1:], flush=True)
        print("to-stderr", file=sys.stderr, flush=True)
        return int(rest[0])
    if mode == "sleep":
        print("ready", flush=True)
        time.sleep(SLEEP_S)
        return 0
    if mode == "graceful":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print("ready", flush=True)
        time.sleep(SLEEP_S)
        return 1
    if mode == "count-terms":  # exit with the number of SIGTERMs that came within a moment of the first
        terms: list[int] = []
        signal.signal(signal.SIGTERM, lambda *_: terms.append(1))
        print("ready", flush=True)
        while not terms:
            time.sleep(0.01)
        time.sleep(COUNT_TERMS_LINGER_S)
        return len(terms)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(SLEEP_S)
        return 1
    if mode == "raise":
        raise ValueError("forkee failed on purpose")
    if mode == "exit-message":
        sys.exit("leaving with a message")
    raise SystemExit(f"unknown mode {mode!r}")
