"""Real ``murmur node start`` daemons beyond loopback: one on a public
address, one behind a home router's NAT (endpoint-independent), on the
emulated internet. The NATed node dials the public one, and they learn
together across the NAT. Root only (skipped otherwise, with the reason)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import pytest

from murmur.node.state import METRICS_FILE
from murmur.testnet import internet
from murmur.testnet.internet import Host, Internet, NatKind, Router, Topology
from tests.integration.cluster import wait_until
from tests.integration.daemons import Daemon, DaemonPool, merge, toml_config
from tests.integration.emulation import require_internet

PORT = 4731  # every host has its own address: the default port for all
ROUNDS = 6
TOGETHER = ROUNDS // 2  # rounds in which each must have aggregated the other's delta
LEARNED_S = 90.0  # two interpreters importing torch on a loaded 2-core box, then the rounds


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    require_internet()


def _sections(index: int, bootstrap: list[str]) -> dict[str, Mapping[str, Any]]:
    return {
        "node": {"listen": [f"/ip4/0.0.0.0/tcp/{PORT}"], "log_format": "json"},
        "network": {"bootstrap": bootstrap, "mdns": False, "neighbours": 1, "shuffle_interval_s": 1.0},
        "api": {"port": 0},
        # each waits for the other before its first round: on a loaded box one
        # interpreter can import torch 20 s after the other, and the first up
        # ran all its rounds alone (a CI failure)
        "learning": {"enabled": True, "trainer": "digits-mlp", "num_nodes": 2, "node_index": index,
                     "rounds": ROUNDS, "local_steps": 5, "round_deadline_s": 3.0, "start_wait_s": LEARNED_S,
                     "threads": 1, "device": "cpu"},
    }


async def _status(net: Internet, host: str, daemon: Daemon) -> dict[str, Any]:
    """``GET /status`` of a daemon whose API listens on its host's loopback."""
    connector = aiohttp.TCPConnector(socket_factory=internet.socket_factory(net.ns(host)))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with http.get(f"{daemon.state.read_api_info().url}/status") as resp:
            return dict(await resp.json())


def _rounds(daemon: Daemon) -> list[dict[str, Any]]:
    path = daemon.data_dir / METRICS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


async def all_rounds_run(net: Internet, daemons: Mapping[str, Daemon]) -> None:
    """Until every daemon (by host) wrote its last round. On a timeout the
    error says where each one stood (rounds, links, view, faults): a CI run
    shows only the assertion, and "not reached" alone once took a loop of
    fifty runs and a state dump to explain."""
    try:
        await wait_until(lambda: all(_rounds(d) and _rounds(d)[-1]["round"] == ROUNDS - 1 for d in daemons.values()),
                         LEARNED_S, f"{ROUNDS} rounds on both nodes")
    except AssertionError as exc:
        stood = {}
        for host, daemon in daemons.items():
            try:
                status = await _status(net, host, daemon)
            except (OSError, aiohttp.ClientError, TimeoutError) as error:
                stood[host] = repr(error)
                continue
            stood[host] = {"round": status["learning"]["round"], "neighbours": len(status["neighbours"]),
                           "view": status["view"], "connections": status["connection_types"],
                           "evictions": status["evictions"], "faults": status["faults"]}
        raise AssertionError(f"{exc}; where each stood: {stood}") from None


def _established_from(net: Internet, host: str) -> set[str]:
    """The remote addresses of the TCP connections to ``host``'s listen port, as its kernel sees them."""
    out = subprocess.run([*net.exec_prefix(host), "ss", "-Htn", "state", "established", f"( sport = :{PORT} )"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


async def test_a_node_behind_nat_learns_with_a_public_node(pool: DaemonPool) -> None:
    topology = Topology(hosts=(Host("pub"), Host("home", router="router")),
                        routers=(Router("router", nat=NatKind.EIM),))
    with Internet(topology) as net:
        public = pool.add(_sections(0, []))
        behind = pool.add(_sections(1, [f"/ip4/{net.address('pub')}/tcp/{PORT}/p2p/{public.state.identity().peer_id}"]))
        try:
            pool.spawn(public, prefix=net.exec_prefix("pub"))
            pool.spawn(behind, prefix=net.exec_prefix("home"))
            await pool.wait_api(public, LEARNED_S)
            await pool.wait_api(behind, LEARNED_S)

            # each advertises its own interface address (none of the machine's, no loopback)
            # and knows whether others can dial it
            pub_status = await _status(net, "pub", public)
            home_status = await _status(net, "home", behind)
            assert pub_status["addrs"] == [f"/ip4/{net.address('pub')}/tcp/{PORT}/p2p/{public.peer_id}"]
            assert home_status["addrs"] == [f"/ip4/{net.address('home')}/tcp/{PORT}/p2p/{behind.peer_id}"]
            assert pub_status["reachability"]["state"] == "public"
            assert home_status["reachability"]["state"] == "private"

            # every round ran on both (a state reached whatever the load), then: most of them with the
            # other's delta, which crossed the NAT (the first may run before the connection is up, and
            # a round may miss its deadline on a loaded machine)
            await all_rounds_run(net, {"pub": public, "home": behind})
            with_other = {d.peer_id: [r["round"] for r in _rounds(d) if o.peer_id in r.get("neighbours", [])]
                          for d, o in ((public, behind), (behind, public))}
            assert all(len(rounds) >= TOGETHER for rounds in with_other.values()), with_other
            # the public node sees the NATed one at its router's public address, never its LAN address
            assert _established_from(net, "pub") == {net.plan.public_address("home")}
            for daemon in (public, behind):
                assert _rounds(daemon)[-1]["accuracy"] > 0.5  # ten digits: 0.1 by chance
        finally:
            pool.teardown()


async def test_two_nodes_behind_symmetric_nats_learn_through_a_public_relay(pool: DaemonPool) -> None:
    """Both nodes behind symmetric NATs (no direct path either way, no hole
    punch predicts such ports), a public murmur relay: the first reserves on
    it (AutoRelay, [relay] use), the second knows only the first's circuit
    address, and they learn together over the relayed connection."""
    topology = Topology(hosts=(Host("relay"), Host("a", router="home_a"), Host("b", router="home_b")),
                        routers=(Router("home_a", nat=NatKind.SYMMETRIC), Router("home_b", nat=NatKind.SYMMETRIC)))
    with Internet(topology) as net:
        try:
            # its own network's learning traffic: circuits between a and b in the relay's learning class
            a, b, relay = await meet_through_relay(pool, net, lambda ids: {"learning_peers": ids})
            a_id = a.peer_id
            await all_rounds_run(net, {"a": a, "b": b})
            with_other = {d.peer_id: [r["round"] for r in _rounds(d) if o.peer_id in r.get("neighbours", [])]
                          for d, o in ((a, b), (b, a))}
            assert all(len(rounds) >= TOGETHER for rounds in with_other.values()), with_other
            b_status = await _status(net, "b", b)
            assert b_status["connection_types"].get(a_id) in ("relayed", None)  # None: a finished and left
            relayed = (await _status(net, "relay", relay))["relay"]
            assert relayed["circuits_total"] >= 1 and relayed["bytes_relayed"] > 10_000, relayed  # the deltas
            # neither home router let anything but the relay in: nobody else connected to a or b
            assert _established_from(net, "relay") >= {net.plan.public_address("a"), net.plan.public_address("b")}
            for daemon in (a, b):
                assert _rounds(daemon)[-1]["accuracy"] > 0.5
        finally:
            pool.teardown()


async def meet_through_relay(pool: DaemonPool, net: Internet, relay_options: Callable[[list[str]], dict[str, Any]]
                             ) -> tuple[Daemon, Daemon, Daemon]:
    """Hosts ``a`` and ``b`` (behind NAT) and a public murmur relay on host
    ``relay`` (``[relay]`` service plus ``relay_options(a and b's ids)``):
    ``a`` reserves on it (``[relay] use``), then ``b``, which knows ``a``
    only by its circuit address, starts. Returns (a, b, relay), all up; the
    caller tears the pool down."""
    a_sections, b_sections = _sections(0, []), _sections(1, [])
    a, b = pool.add(a_sections), pool.add(b_sections)
    ids = [str(d.state.identity().peer_id) for d in (a, b)]
    relay = pool.add({
        "node": {"listen": [f"/ip4/0.0.0.0/tcp/{PORT}"], "log_format": "json"},
        "network": {"mdns": False},
        "api": {"port": 0},
        "learning": {"enabled": False},
        "relay": {"service": True, **relay_options(ids)},
    })
    relay_addr = f"/ip4/{net.address('relay')}/tcp/{PORT}/p2p/{relay.state.identity().peer_id}"
    circuit = f"{relay_addr}/p2p-circuit/p2p/{ids[0]}"
    for daemon, sections in ((a, a_sections), (b, b_sections)):
        sections["network"] = {**sections["network"], "neighbours": 2}  # the relay (no learner) takes a slot
        sections["relay"] = {"use": [relay_addr], "check_interval_s": 1.0}
    b_sections["network"] = {**b_sections["network"], "bootstrap": [circuit]}
    _rewrite(a, a_sections)
    _rewrite(b, b_sections)
    pool.spawn(relay, prefix=net.exec_prefix("relay"))
    pool.spawn(a, prefix=net.exec_prefix("a"))
    await pool.wait_api(relay, LEARNED_S)
    await pool.wait_api(a, LEARNED_S)
    await wait_until(_has_circuit(net, a, circuit), LEARNED_S, "a reserved on the relay")
    pool.spawn(b, prefix=net.exec_prefix("b"))
    await pool.wait_api(b, LEARNED_S)
    return a, b, relay


def _rewrite(daemon: Daemon, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """Its config again (the relay's and the peers' ids are known only once each has its data dir)."""
    daemon.config.write_text(toml_config(merge(sections, {"node": {"data_dir": str(daemon.data_dir)}})),
                             encoding="utf-8")


def _has_circuit(net: Internet, daemon: Daemon, circuit: str) -> Any:
    async def check() -> bool:
        status = await _status(net, "a", daemon)
        return any(circuit.startswith(c) for c in status["relay_client"]["circuit_addrs"])
    return check
