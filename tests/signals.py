"""Signal hygiene for tests that Ctrl-C a child process."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """``preexec_fn`` for a child the test will SIGINT: SIGINT back to its
    default action. A shell ignores SIGINT and SIGQUIT in commands it runs in
    the background (``scripts/test &``), exec keeps an ignored signal
    ignored, and Python then installs no KeyboardInterrupt handler: the child
    would sleep through the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
