"""Soak a learning node with every hostile peer at once; compare with peace.

Two real ``murmur node start`` processes learn digits on loopback: the
victim, and an honest peer whose only neighbour it is. The same pair runs
twice, each time for ``--seconds``: once in peace, once while every attack in
:mod:`murmur.testnet.hostile` runs against the victim at the same time (a
peer that never reads, half-open and authenticated slot floods from many
/24s, silent Link-only strangers claiming the victim's model, largest-frame
headers that stall, a Hello flood of fresh identities, model requests and
malformed messages, resets right after connect).

Printed, for the attacked run against the peaceful one: the honest peer's
rounds per second (target >= 0.8x: the victim keeps learning with it), and
the victim's peak RSS (target within 2x), plus what each attack managed and
the victim's fault counters. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from murmur.learning.fingerprint import ModelFingerprint  # noqa: E402
from murmur.learning.trainers.base import TrainerContext  # noqa: E402
from murmur.learning.trainers.registry import load_trainer  # noqa: E402
from murmur.node.state import StateDir  # noqa: E402
from murmur.protocol.messages import NO_MORE_ROUNDS, LearnerInfo  # noqa: E402
from murmur.protocol.multiaddr import Multiaddr  # noqa: E402
from murmur.testnet.hostile import ALL_ATTACKS, Target, run_attacks  # noqa: E402

TRAINER = "digits-mlp"
DEADLINE_S = 2.0
START_S = 60.0
WARMUP_ROUNDS = 5
ATTACKER_NICE = 10
MURMUR = [sys.executable, "-m", "murmur.node.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(data_dir: Path, port: int, bootstrap: str | None) -> str:
    boot = json.dumps([bootstrap] if bootstrap else [])
    return f"""
[node]
data_dir = "{data_dir}"
listen = ["/ip4/127.0.0.1/tcp/{port}"]
log_format = "json"
[network]
bootstrap = {boot}
neighbours = 1
allow_loopback = true
[api]
port = 0
[learning]
trainer = "{TRAINER}"
num_nodes = 2
rounds = 0
round_deadline_s = {DEADLINE_S}
threads = 1
device = "cpu"
local_steps = 5
"""


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rounds_done(data_dir: Path) -> int:
    return len(StateDir(data_dir).read_metrics())


class Pair:
    """The victim and the honest peer, as processes this bench owns."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.victim_dir, self.honest_dir = root / "victim", root / "honest"
        self.victim_port = free_port()
        victim_id = StateDir(self.victim_dir).identity().peer_id
        self.victim_addr = Multiaddr("127.0.0.1", self.victim_port, victim_id)
        for name, data_dir, port, boot in (("victim", self.victim_dir, self.victim_port, None),
                                           ("honest", self.honest_dir, 0, str(self.victim_addr))):
            path = root / f"{name}.toml"
            path.write_text(config(data_dir, port, boot), encoding="utf-8")
            with open(root / f"{name}.log", "wb") as log:
                self.procs.append(subprocess.Popen([*MURMUR, "node", "start", "--config", str(path)],
                                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    @property
    def victim(self) -> subprocess.Popen[bytes]:
        return self.procs[0]

    def wait_warm(self) -> None:
        end = time.monotonic() + START_S
        while rounds_done(self.honest_dir) < WARMUP_ROUNDS:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise SystemExit(f"a node exited: see {self.root}")
            if time.monotonic() > end:
                raise SystemExit(f"no {WARMUP_ROUNDS} rounds within {START_S} s: see {self.root}")
            time.sleep(0.2)

    def status(self) -> dict[str, Any]:
        import urllib.request

        info = StateDir(self.victim_dir).read_api_info()
        with urllib.request.urlopen(f"{info.url}/status", timeout=5) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def victim_info() -> LearnerInfo:
    """What the victim tells peers of its model: attackers claim the same."""
    trainer = load_trainer(TRAINER)(TrainerContext(0, 2, 0, device="cpu"))
    fingerprint = ModelFingerprint(TRAINER, trainer.param_shapes(), "fp32")
    return LearnerInfo(fingerprint=fingerprint.digest, model=fingerprint.describe(), next_round=NO_MORE_ROUNDS)


def run(seconds: float, attacks: list[str], info: LearnerInfo) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="murmur-hostile-") as tmp:
        pair = Pair(Path(tmp))
        try:
            pair.wait_warm()
            before, start = rounds_done(pair.honest_dir), time.monotonic()
            stats = []
            if attacks:
                # The attackers share this machine's two cores with the victim;
                # a real one brings its own. At a lower priority they take what
                # the nodes leave (their rates are what the bench reports).
                os.nice(ATTACKER_NICE)
                target = Target(pair.victim_addr, info)
                stats = asyncio.run(run_attacks(target, seconds, attacks))
            else:
                time.sleep(seconds)  # the measured window itself
            elapsed = time.monotonic() - start
            rate = (rounds_done(pair.honest_dir) - before) / elapsed
            alive = pair.victim.poll() is None
            status = pair.status() if alive else {}
            return {
                "honest_rounds_per_s": round(rate, 2),
                "victim_peak_rss_mib": round(peak_rss_mib(pair.victim.pid), 1) if alive else None,
                "victim_alive": alive,
                "victim_connections": status.get("connections"),
                "victim_faults": status.get("faults"),
                "victim_healthy": (status.get("health") or {}).get("ok"),
                "attacks": [asdict(s) for s in stats],
            }
        finally:
            pair.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="length of each run (default 120)")
    parser.add_argument("--attacks", nargs="*", default=list(ALL_ATTACKS), choices=list(ALL_ATTACKS))
    args = parser.parse_args()
    info = victim_info()
    peace = run(args.seconds, [], info)
    print(f"peace:    honest {peace['honest_rounds_per_s']} rounds/s, victim peak RSS {peace['victim_peak_rss_mib']} MiB",
          flush=True)
    war = run(args.seconds, args.attacks, info)
    print(f"attacked: honest {war['honest_rounds_per_s']} rounds/s, victim peak RSS {war['victim_peak_rss_mib']} MiB, "
          f"alive {war['victim_alive']}, healthy {war['victim_healthy']}, faults {war['victim_faults']}", flush=True)
    for attack in war["attacks"]:
        print(f"  {attack['name']:<12} connects {attack['connects']:>6}  messages {attack['messages']:>7}  "
              f"failures {attack['failures']:>5}  {'; '.join(attack['errors'][:1])}")
    rounds_ratio = war["honest_rounds_per_s"] / peace["honest_rounds_per_s"] if peace["honest_rounds_per_s"] else 0.0
    rss_ratio = (war["victim_peak_rss_mib"] or float("inf")) / peace["victim_peak_rss_mib"]
    print(f"rounds/s ratio {rounds_ratio:.2f} (target >= 0.8), peak RSS ratio {rss_ratio:.2f} (target <= 2)")
    print(json.dumps({"bench": "hostile", "seconds": args.seconds, "rounds_ratio": round(rounds_ratio, 3),
                      "rss_ratio": round(rss_ratio, 3), "peace": peace, "attacked": war}))


if __name__ == "__main__":
    main()
