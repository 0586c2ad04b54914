"""tune_allocator: frame-sized buffers stop costing page faults once it ran.

Run in child processes: the tuning is process-wide and must not leak into
the test session, and each child starts from glibc's default thresholds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CHURN = """
import resource, sys
from murmur.protocol.transport import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()
frame = 1024 * 1024 + 21
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
keep = [bytes(frame) for _ in range(3)]   # a few frames alive, as in a stream
del keep
start = faults()
for _ in range(200):                      # the stream pattern: two frame-sized objects per frame
    a = bytearray(frame); b = bytes(a); del a; del b
print(faults() - start)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_frame_sized_churn_stops_faulting_once_tuned() -> None:
    tuned, default = _faults("tuned"), _faults("default")
    # 200 frames, two 1 MiB objects each (256 pages apiece): glibc's defaults
    # fault on nearly every page; tuned, only the heap's first growth does.
    assert default > 200 * 256
    assert tuned < 4 * 256
