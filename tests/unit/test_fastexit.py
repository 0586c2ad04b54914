"""exit_after_shutdown: keeps the exit code and everything buffered, skips teardown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, sys
from murmur.fastexit import exit_after_shutdown
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
logging.getLogger("t").info("persisted before exit")
sys.stdout.write("buffered stdout")  # no newline, no flush: only exit_after_shutdown flushes it
import atexit
atexit.register(lambda: print("atexit ran"))  # must be skipped
exit_after_shutdown(3)
"""


def test_exit_code_logs_and_stdout_survive(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered stdout"
    assert "persisted before exit" in log.read_text()
