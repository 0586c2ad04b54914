"""Reaching a node behind NAT on the emulated internet: connection set-up and
throughput, relayed against direct, on the same rate-limited links.

Three hosts on the emulated internet (root only: network namespaces,
nftables NAT, ``tc tbf``), each link limited to ``--mbit`` each way: a public
relay (murmur's circuit relay v2 service, with limits that carry whole
transfers, as a network's own relay has for its members), a public
dialler, and a private host behind an endpoint-independent NAT that holds a
reservation on the relay. Printed, median over ``--tries``:

* ``direct_connect_ms``: the dialler's TCP connect + security + muxer
  upgrade to a public host (the relay);
* ``relayed_connect_ms``: the dialler reaching the private host through its
  circuit (HOP CONNECT, STOP, then the same upgrade inside the circuit),
  over its existing connection to the relay; ``relayed_connect_ratio``
  relayed / direct;
* ``direct_mbit`` and ``relayed_mbit``: ``--mib`` MiB through one stream to
  the public host, and to the private one through the relay (each counted
  once the receiver has all of it); ``relayed_vs_direct`` their ratio
  (the relay's copy and one more hop on the same link rates);
* then the path a node behind NAT takes to a peer behind another
  endpoint-independent NAT: a second private host reaches the first through
  its circuit and the first upgrades the relayed connection by DCUtR (a TCP
  hole punch from both listen ports), on fresh hosts and ports each try:
  ``punch_ms`` (from the relayed connection up to the punched one; the
  punch rounds' success share is ``punched_share``), ``relayed_then_punched_ms``
  (circuit dial plus punch: until the two talk directly), and
  ``punched_mbit`` / ``punched_vs_relayed``: the same transfer over the
  punched connection.

With ``--learning``, then, real daemons: ``murmur testnet run`` of
``scenarios/nat_relay.toml`` (8 honest nodes, each behind a router of its
own, half endpoint-independent and half symmetric, one public relay node):
for each honest node, seconds from its start to its first connection to a
peer other than the relay (``first_peer_s``) and to its first learning round
that mixed a neighbour's model (``first_learning_round_s``), medians over
the nodes behind each NAT kind (EIM pairs end punched, symmetric ones
relayed), and the run's final accuracy and connection mix.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from murmur.protocol.identity import Identity  # noqa: E402
from murmur.protocol.libp2p import Libp2pConnection, Libp2pHost  # noqa: E402
from murmur.protocol.libp2p.connection import Stream  # noqa: E402
from murmur.protocol.libp2p.dcutr import HolePuncher  # noqa: E402
from murmur.protocol.libp2p.host import HostConfig  # noqa: E402
from murmur.protocol.libp2p.relay import RelayClient, RelayConfig, RelayService  # noqa: E402
from murmur.protocol.multiaddr import DialAddr  # noqa: E402
from murmur.protocol.transport import TransportLimits  # noqa: E402
from murmur.testnet import internet  # noqa: E402
from murmur.testnet.internet import Host, Internet, LinkRate, NatKind, Router, Topology  # noqa: E402

PORT = 4001
PUNCH_BASE_PORT = 20000  # each punch try's hosts listen on fresh ports (a closed try's TIME_WAIT stays)
SINK = "/murmur-bench/sink/1.0.0"
CHUNK = 256 * 1024


async def sink(stream: Stream) -> None:
    """Reads until the sender's FIN, then answers with the byte count (8 bytes)."""
    total = 0
    while data := await stream.read():
        total += len(data)
    await stream.write(total.to_bytes(8, "big"))
    await stream.close_write()


def _host(net: Internet, name: str) -> Libp2pHost:
    ns = net.ns(name)
    host = Libp2pHost(Identity.generate(), HostConfig(limits=TransportLimits(connect_timeout_s=5.0)),
                      make_socket=lambda family: internet.socket_in(ns, family))
    host.set_handler(SINK, sink)
    return host


async def _send(conn: Libp2pConnection, size: int) -> float:
    """Seconds until the receiver holds all ``size`` bytes."""
    payload = bytes(CHUNK)
    stream = await conn.open_stream(SINK)
    start = time.perf_counter()
    sent = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        await stream.write(payload[:n])
        sent += n
    await stream.close_write()
    got = int.from_bytes(await stream.readexactly(8), "big")
    elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"the receiver counted {got} bytes of {size}")
    return elapsed


async def _punch_try(net: Internet, relay_addr: object, port: int, size: int | None) -> tuple[float, float, float | None]:
    """One punch between fresh hosts behind the two EIM NATs: seconds to the
    circuit, seconds from it to the punched connection (inf: no punch), and
    the seconds of a ``size`` transfer over the punched one (if asked)."""
    a, b = _host(net, "private"), _host(net, "other")
    relay_b, relay_a = RelayClient(b), RelayClient(a)
    punch_a, punch_b = HolePuncher(a), HolePuncher(b)  # a answers b's DCUtR stream
    try:
        for host, p in ((a, port), (b, port + 1)):
            await host.listen(net.address("private" if host is a else "other"), p)
            await host.dial(relay_addr)  # type: ignore[arg-type]  # from the listen port: the relay sees the mapping
        await relay_b.reserve(next(c for c in b.connections if c.peer_id == relay_addr.peer_id))  # type: ignore[attr-defined]
        start = time.perf_counter()
        await relay_a.dial_addr(DialAddr.parse(f"{relay_addr}/p2p-circuit/p2p/{b.peer_id}"))
        relayed_s = time.perf_counter() - start
        while not any(c.relay is not None for c in b.connections):
            await asyncio.sleep(0.005)  # polling b's side of the circuit into existence (bench timing, not a test)
        inbound = next(c for c in b.connections if c.relay is not None)
        start = time.perf_counter()
        direct = await punch_b.upgrade(inbound)
        punch_s = time.perf_counter() - start
        if direct is None or not direct.punched:
            return relayed_s, float("inf"), None
        return relayed_s, punch_s, (await _send(direct, size)) if size else None
    finally:
        for puncher in (punch_a, punch_b):
            await puncher.close()
        for host in (a, b):
            await host.close()


async def run(tries: int, mib: float, mbit: float) -> dict[str, object]:
    rate = LinkRate(up_mbit=mbit, down_mbit=mbit)
    topology = Topology(hosts=(Host("relay", rate=rate), Host("dialler", rate=rate),
                               Host("private", router="home", rate=rate), Host("other", router="home2", rate=rate)),
                        routers=(Router("home", nat=NatKind.EIM), Router("home2", nat=NatKind.EIM)))
    size = int(mib * 1024 * 1024)
    with Internet(topology) as net:
        relay_host, dialler, private = (_host(net, n) for n in ("relay", "dialler", "private"))
        try:
            # a network's own relay: its circuits carry whole transfers (the punch tries' fresh hosts too)
            RelayService(relay_host, RelayConfig(circuit_duration_s=3600, circuit_data_bytes=1 << 30,
                                                 max_reservations_per_ip=64))
            (relay_addr,) = await relay_host.listen(net.address("relay"), PORT)
            private_client, dialler_client = RelayClient(private), RelayClient(dialler)
            await private_client.reserve(await private.dial(relay_addr))
            to_relay = await dialler.dial(relay_addr)
            circuit = DialAddr.parse(f"{relay_addr}/p2p-circuit/p2p/{private.peer_id}")

            direct_ms, relayed_ms = [], []
            for _ in range(tries):
                start = time.perf_counter()
                conn = await dialler.dial(relay_addr)
                direct_ms.append((time.perf_counter() - start) * 1000)
                await conn.close()
                start = time.perf_counter()
                conn = await dialler_client.dial_addr(circuit)
                relayed_ms.append((time.perf_counter() - start) * 1000)
                await conn.close()

            relayed_conn = await dialler_client.dial_addr(circuit)
            direct_s = [await _send(to_relay, size) for _ in range(tries)]
            relayed_s = [await _send(relayed_conn, size) for _ in range(tries)]
            punches = [await _punch_try(net, relay_addr, PUNCH_BASE_PORT + 2 * i, size if i == tries - 1 else None)
                       for i in range(tries)]
        finally:
            for host in (dialler, private, relay_host):
                await host.close()
    direct_mbit = size * 8 / 1e6 / statistics.median(direct_s)
    relayed_mbit = size * 8 / 1e6 / statistics.median(relayed_s)
    punched = [p for p in punches if p[1] != float("inf")]
    transfer = next((p[2] for p in punches if p[2] is not None), None)
    punched_mbit = size * 8 / 1e6 / transfer if transfer else None
    return {
        "bench": "nat", "tries": tries, "mib": mib, "link_mbit": mbit,
        "direct_connect_ms": round(statistics.median(direct_ms), 2),
        "relayed_connect_ms": round(statistics.median(relayed_ms), 2),
        "relayed_connect_ratio": round(statistics.median(relayed_ms) / statistics.median(direct_ms), 2),
        "direct_mbit": round(direct_mbit, 2), "relayed_mbit": round(relayed_mbit, 2),
        "relayed_vs_direct": round(relayed_mbit / direct_mbit, 3),
        "punched_share": round(len(punched) / len(punches), 3),
        "punch_ms": round(statistics.median(p[1] for p in punched) * 1000, 2) if punched else None,
        "relayed_then_punched_ms": round(statistics.median((p[0] + p[1]) for p in punched) * 1000, 2)
        if punched else None,
        "punched_mbit": round(punched_mbit, 2) if punched_mbit else None,
        "punched_vs_relayed": round(punched_mbit / relayed_mbit, 3) if punched_mbit else None,
    }


def _events(log: Path, event: str) -> list[dict[str, object]]:
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        if f'"event": "{event}"' in line:
            out.append(json.loads(line))
    return out


def _unix(ts: object) -> float:
    return datetime.datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()


def learning(timeout_s: float = 300.0) -> dict[str, object]:
    """The NAT relay scenario on real daemons: when each node behind NAT met a peer and first learnt with one."""
    scenario = REPO / "murmur" / "testnet" / "scenarios" / "nat_relay.toml"
    with tempfile.TemporaryDirectory(prefix="murmur-bench-nat-") as tmp:
        out = Path(tmp) / "run"
        done = subprocess.run([sys.executable, "-m", "murmur.node.cli", "testnet", "run", str(scenario), "--out",
                               str(out), "--no-dashboard"], capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the NAT relay testnet failed: {done.stderr[-2000:]}")
        layout = json.loads((out / "network.json").read_text(encoding="utf-8"))["nodes"]
        summary = json.loads((out / "report" / "summary.json").read_text(encoding="utf-8"))
        relays = {v["peer_id"] for v in layout.values() if v.get("role") == "relay" or v["router"] is None}
        by_kind: dict[str, dict[str, list[float]]] = {}
        for name, node in layout.items():
            if node["router"] is None:
                continue
            log = out / "logs" / f"{name}.log"
            started = _unix(_events(log, "started")[0]["ts"])
            peers = [_unix(e["ts"]) for e in _events(log, "connected") if e.get("peer") not in relays]
            rows = [json.loads(line) for line in (out / "nodes" / name / "metrics.jsonl").read_text().splitlines()]
            mixed = [r["ts"] for r in rows if r.get("neighbours")]
            kind = by_kind.setdefault(node["nat"], {"first_peer_s": [], "first_learning_round_s": []})
            if peers:
                kind["first_peer_s"].append(min(peers) - started)
            if mixed:
                kind["first_learning_round_s"].append(min(mixed) - started)
    return {
        "learning_accuracy": round(summary["final_mean_accuracy"], 3),
        "learning_connections": summary.get("connections"),
        **{f"{kind}_{key}": round(statistics.median(values), 2) if values else None
           for kind, keys in sorted(by_kind.items()) for key, values in keys.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--mib", type=float, default=8.0, help="MiB sent per throughput try")
    parser.add_argument("--mbit", type=float, default=50.0, help="every host's link rate, each way")
    parser.add_argument("--learning", action="store_true",
                        help="also run the NAT relay testnet: time to the first peer and first learning round")
    args = parser.parse_args()
    problem = internet.probe().internet
    if problem is not None:
        print(f"bench/nat.py needs the emulated internet: {problem}", file=sys.stderr)
        raise SystemExit(2)
    result = asyncio.run(run(args.tries, args.mib, args.mbit))
    if args.learning:
        result |= learning()
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
