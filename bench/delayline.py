"""The testnet's delay line (latency without tc netem): what it costs a link
and what it adds to a round trip, against a plain cable in the same run.

Three public hosts on the emulated internet (root only): ``s1`` dials ``s2``,
whose cable carries a delay line (``Host(delay_line=True)``), and ``s3``,
whose cable is plain veth. Printed, each a median over ``--tries``:

* ``plain_mbit`` / ``line_mbit``: ``--mib`` MiB of bulk TCP from s1 to s3 and
  to s2 at 0 ms, no link rate; ``line_vs_plain`` their ratio (what one Python
  process forwarding every frame costs next to the kernel's veth);
  ``line_cpu``: the delay line's CPU time over that transfer's wall time
  (1.0 = one core);
* at ``--mbit`` on both links (tbf, the rates testnets use): ``rated_plain_mbit``,
  ``rated_line_mbit`` (0 ms), ``rated_delayed_mbit`` (``--ms`` each way on s2,
  so a round trip ``2 --ms`` longer; TCP's window limits it past some
  rate x delay), the ratios to plain, and ``rated_line_cpu``;
* ``rtt_plain_ms`` / ``rtt_line_ms`` (0 ms) and ``rtt_delayed_ms``: UDP round
  trips; ``rtt_added_ms`` delayed minus line, against ``rtt_expected_ms``
  (``2 --ms``).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from murmur.testnet import internet  # noqa: E402
from murmur.testnet.internet import Host, Internet, LinkRate, Topology  # noqa: E402
from tests.integration.emulation import Transfer, rtt_ms, transfer  # noqa: E402

PORT = 7300
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (/proc/<pid>/stat fields 14-15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def timed(pid: int, run: Callable[[], Transfer]) -> tuple[Transfer, float]:
    """``run``'s transfer and the delay line's CPU share over its wall time."""
    cpu, wall = cpu_seconds(pid), time.monotonic()
    done = run()
    return done, (cpu_seconds(pid) - cpu) / (time.monotonic() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="bulk TCP per unlimited transfer")
    parser.add_argument("--mbit", type=float, default=20.0, help="link rate of the rated rows")
    parser.add_argument("--rated-s", type=float, default=3.0, help="seconds each rated transfer lasts")
    parser.add_argument("--ms", type=float, default=50.0, help="one-way delay of the delayed rows")
    parser.add_argument("--tries", type=int, default=3)
    args = parser.parse_args()
    caps = internet.probe()
    problem = caps.internet or caps.delay
    if problem is not None:
        print(f"bench/delayline.py needs the emulated internet and its delay line: {problem}", file=sys.stderr)
        raise SystemExit(2)
    port = iter(range(PORT, PORT + 1000))
    fig: dict[str, float] = {}
    nbytes = args.mib << 20
    rated_bytes = int(args.mbit * 1e6 / 8 * args.rated_s)
    with Internet(Topology(hosts=(Host("s1"), Host("s2", delay_line=True), Host("s3")))) as net:
        (pid,) = net.delay_line_pids

        def bulk(server: str, size: int) -> Callable[[], Transfer]:
            return lambda: transfer(net, "s1", server, size, next(port), upload=True)

        def median_of(server: str, size: int) -> tuple[float, float]:
            runs = [timed(pid, bulk(server, size)) for _ in range(args.tries)]
            return statistics.median(r.mbit_s for r, _ in runs), statistics.median(c for _, c in runs)

        fig["plain_mbit"], _ = median_of("s3", nbytes)
        fig["line_mbit"], fig["line_cpu"] = median_of("s2", nbytes)
        fig["line_vs_plain"] = fig["line_mbit"] / fig["plain_mbit"]
        fig["rtt_plain_ms"] = rtt_ms(net, "s1", "s3", next(port))
        fig["rtt_line_ms"] = rtt_ms(net, "s1", "s2", next(port))
        for host in ("s1", "s2", "s3"):
            net.set_rate(host, LinkRate(args.mbit, args.mbit))
        fig["rated_plain_mbit"], _ = median_of("s3", rated_bytes)
        fig["rated_line_mbit"], fig["rated_line_cpu"] = median_of("s2", rated_bytes)
        net.set_latency("s2", args.ms)
        fig["rated_delayed_mbit"], fig["rated_delayed_cpu"] = median_of("s2", rated_bytes)
        fig["rtt_delayed_ms"] = rtt_ms(net, "s1", "s2", next(port))
    fig["rated_line_vs_plain"] = fig["rated_line_mbit"] / fig["rated_plain_mbit"]
    fig["rated_delayed_vs_plain"] = fig["rated_delayed_mbit"] / fig["rated_plain_mbit"]
    fig["rtt_added_ms"] = fig["rtt_delayed_ms"] - fig["rtt_line_ms"]
    fig["rtt_expected_ms"] = 2 * args.ms
    print(f"bulk {args.mib} MiB: plain {fig['plain_mbit']:.0f} Mbit/s, through the line at 0 ms "
          f"{fig['line_mbit']:.0f} ({fig['line_vs_plain']:.2f}x), line CPU {fig['line_cpu']:.2f} core")
    print(f"at {args.mbit:g} Mbit/s: plain {fig['rated_plain_mbit']:.1f}, line {fig['rated_line_mbit']:.1f} "
          f"({fig['rated_line_vs_plain']:.2f}x, CPU {fig['rated_line_cpu']:.3f}), {args.ms:g} ms each way "
          f"{fig['rated_delayed_mbit']:.1f} ({fig['rated_delayed_vs_plain']:.2f}x, CPU {fig['rated_delayed_cpu']:.3f})")
    print(f"rtt: plain {fig['rtt_plain_ms']:.3f} ms, line {fig['rtt_line_ms']:.3f} ms, {args.ms:g} ms each way "
          f"{fig['rtt_delayed_ms']:.1f} ms (added {fig['rtt_added_ms']:.1f}, expected {fig['rtt_expected_ms']:g})")
    print(json.dumps({"bench": "delayline", "mib": args.mib, "mbit": args.mbit, "ms": args.ms, "tries": args.tries,
                      **{k: round(v, 4) for k, v in fig.items()}}))


if __name__ == "__main__":
    main()
