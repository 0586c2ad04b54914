"""Leave the process as soon as a graceful shutdown has finished.

Why: once a daemon has stopped (checkpoints fsynced, Goodbyes sent, sockets
closed, logs written), CPython still finalises the interpreter: it tears down
every module and runs native destructors (torch, OpenMP pools, BLAS). That
takes ~1 s for a bare ``import torch`` and ~3 s for a worker that trained, on
an idle 2-core machine — longer under load, where a testnet's SIGTERM grace
period (5 s) ran out and the controller had to SIGKILL workers whose nodes had
long since stopped. Nothing of that teardown matters to a process that has
already persisted its state, so after flushing what is buffered we leave with
``os._exit``.

Only call this after the shutdown that persists state has returned: it skips
``atexit`` handlers and ``finally`` blocks further up the stack.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_after_shutdown(code: int) -> NoReturn:
    """Flush logging and stdio, then end the process with ``code`` at once."""
    logging.shutdown()  # flushes and closes every handler (file handlers included)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to save
            pass
    os._exit(code)
