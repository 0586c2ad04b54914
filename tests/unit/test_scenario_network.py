"""A scenario's ``[network]`` section: parsing, its errors, the emulated
internet it describes, and the node configs placed on it (pure)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from murmur.errors import ConfigError, OptionError
from murmur.node.config import load_config
from murmur.protocol.multiaddr import Multiaddr
from murmur.testnet import internet
from murmur.testnet.internet import Capabilities, LinkRate, NatKind
from murmur.testnet.scenario import (
    NETWORK_PORT,
    check_network,
    dump_toml,
    network_dials,
    network_topology,
    node_configs,
    parse_scenario,
    process_groups,
    provision_identities,
    relays_for,
)

BASE = """\
nodes = 5
nodes_per_process = 4

[topology]
degree = 2

[duration]
rounds = 5

[[attackers]]
sybils = 2
edges_per_sybil = 1
"""
NETWORK = """
[network]
up_mbit = 20

[[network.routers]]
nodes = [1, 2]

[[network.routers]]
nat = "symmetric"
nodes = [3, 5, 6]

[[network.links]]
nodes = [2]
down_mbit = 5
"""


def _scenario(network: str = NETWORK):  # noqa: ANN202 - a Scenario
    return parse_scenario(BASE + network)


def test_network_section_places_hosts_behind_routers_with_rates() -> None:
    sc = _scenario()
    assert sc.network is not None and [r.nat for r in sc.network.routers] == [NatKind.EIM, NatKind.SYMMETRIC]
    topology = network_topology(sc)
    hosts = {h.name: h for h in topology.hosts}
    # each honest node a host; the attacker's two Sybils (nodes 5, 6) one host
    assert list(hosts) == ["node0", "node1", "node2", "node3", "node4", "attacker0"]
    assert {n: h.router for n, h in hosts.items()} == {
        "node0": None, "node1": "router0", "node2": "router0", "node3": "router1", "node4": None,
        "attacker0": "router1"}
    assert hosts["node0"].rate == LinkRate(20.0, None)
    assert hosts["node2"].rate == LinkRate(20.0, 5.0)  # its link entry over the section's default
    assert [(r.name, r.nat) for r in topology.routers] == [("router0", NatKind.EIM), ("router1", NatKind.SYMMETRIC)]
    internet.plan(topology)  # a topology the emulated internet builds


LATENCY = """
[[churn]]
at_round = 2
action = "latency"
nodes = [2, 6]
ms = 40

[[churn]]
at_round = 3
action = "latency"
nodes = [2]
ms = 0
"""


def test_only_the_hosts_latency_steps_name_get_a_delay_line() -> None:
    """Node 6 is a Sybil: its attacker's host gets it. A step naming
    nobody names every host; no step, no host."""
    def wired(extra: str) -> list[str]:
        return [h.name for h in network_topology(_scenario(NETWORK + extra)).hosts if h.delay_line]

    assert wired("") == []
    assert wired(LATENCY) == ["node2", "attacker0"]
    assert wired(LATENCY.replace("nodes = [2, 6]\n", "")) == ["node0", "node1", "node2", "node3", "node4",
                                                               "attacker0"]
    p = internet.plan(network_topology(_scenario(NETWORK + LATENCY)))
    assert sorted(n for n, h in p.hosts.items() if h.wire is not None) == ["attacker0", "node2"]


def test_without_a_network_section_nothing_changes() -> None:
    sc = parse_scenario(BASE)
    assert sc.network is None
    assert process_groups(sc) == [[0, 1, 2, 3], [4], [5, 6]]


def test_every_host_is_a_process_of_its_own() -> None:
    assert process_groups(_scenario()) == [[0], [1], [2], [3], [4], [5, 6]]
    assert process_groups(_scenario(), nodes_per_process=8) == [[0], [1], [2], [3], [4], [5, 6]]


def test_nodes_dial_only_whom_they_can_reach() -> None:
    dials = network_dials(_scenario())
    public = {0, 4}
    lan = {1: {2}, 2: {1}, 3: {5, 6}}
    for i, chosen in dials.items():
        assert chosen, i
        assert all(j < 5 for j in chosen)  # honest nodes only
        assert set(chosen) <= public | lan.get(i, set()), (i, chosen)


def test_node_configs_listen_on_their_hosts_and_bootstrap_at_reachable_addresses(tmp_path: Path) -> None:
    sc = _scenario()
    plan = internet.plan(network_topology(sc))
    configs = node_configs(sc, tmp_path, base_port=0, plan=plan)
    addr = {i: Multiaddr.parse(cfg["node"]["listen"][0]) for i, cfg in enumerate(configs)}
    assert addr[0] == Multiaddr(plan.hosts["node0"].address, NETWORK_PORT)
    assert addr[1].host.startswith("10.1.0.") and addr[3].host.startswith("10.2.0.")
    # the attacker's identities share its host, on consecutive ports
    assert (addr[5].host, addr[5].port, addr[6].host, addr[6].port) == (
        plan.hosts["attacker0"].address, NETWORK_PORT, plan.hosts["attacker0"].address, NETWORK_PORT + 1)
    dials = network_dials(sc)
    for i, cfg in enumerate(configs):
        boot = [Multiaddr.parse(a) for a in cfg["network"]["bootstrap"]]
        assert [(b.host, b.port) for b in boot] == [(addr[j].host, addr[j].port) for j in dials[i]]
        assert cfg["network"]["allow_loopback"] is False and cfg["api"]["host"] == "127.0.0.1"
        path = tmp_path / f"n{i}.toml"
        path.write_text(dump_toml(cfg))
        assert list(load_config(path).node.listen) == [addr[i]]  # a config the node accepts


ALL_BEHIND_NATS = """
[network]
relays = 1

[[network.routers]]
nodes = [0]

[[network.routers]]
nat = "symmetric"
nodes = [1, 2]

[[network.routers]]
nodes = [3]

[[network.routers]]
nat = "symmetric"
nodes = [4]

[[network.routers]]
nodes = [5, 6]
"""


def test_a_relay_node_is_a_public_host_that_relays_the_honest_nodes_learning(tmp_path: Path) -> None:
    """Every honest node behind a NAT (no node could dial another without a
    relay: accepted since there is one): the relay is a public host of its
    own, learns nothing, carries the honest nodes' rounds in its learning
    class, and every node behind a router bootstraps to it and reserves on it."""
    sc = _scenario(ALL_BEHIND_NATS)
    specs = sc.node_specs()
    assert [(s.name, s.role.value) for s in specs[5:]] == [("sybil0-0", "attacker"), ("sybil0-1", "attacker"),
                                                         ("relay0", "relay")]
    assert sc.total_nodes == 8
    hosts = {h.name: h for h in network_topology(sc).hosts}
    assert hosts["relay0"].router is None and all(hosts[f"node{i}"].router is not None for i in range(5))
    plan = internet.plan(network_topology(sc))
    configs = node_configs(sc, tmp_path, base_port=0, plan=plan)
    ids = provision_identities(sc, tmp_path)
    relay = configs[7]
    assert relay["learning"]["enabled"] is False
    assert relay["relay"]["service"] is True
    assert relay["relay"]["learning_peers"] == sorted(ids[f"node{i}"] for i in range(5))  # not the Sybils
    relay_addr = f"/ip4/{plan.hosts['relay0'].address}/tcp/{NETWORK_PORT}/p2p/{ids['relay0']}"
    for i in range(7):
        assert configs[i]["relay"]["use"] == [relay_addr], i
        assert relay_addr in configs[i]["network"]["bootstrap"], i
        assert configs[i]["transport"]["connect_timeout_s"] == 1.0  # a router's silence is not waited out 5 s
    # the relay learns nothing and may take a neighbour slot: honest nodes get one more
    assert [configs[i]["network"]["neighbours"] for i in range(5)] == [sc.topology.degree + 1] * 5
    assert network_dials(sc)[7] == []  # everyone dials the relay
    path = tmp_path / "relay.toml"
    path.write_text(dump_toml(relay))
    loaded = load_config(path)
    assert loaded.relay.service and not loaded.learning.enabled  # a config the node accepts
    assert process_groups(sc) == [[0], [1], [2], [3], [4], [5, 6], [7]]


def test_public_honest_nodes_relay_by_default_and_share_the_load(tmp_path: Path) -> None:
    sc = _scenario()  # nodes 0 and 4 are public
    plan = internet.plan(network_topology(sc))
    configs = node_configs(sc, tmp_path, base_port=0, plan=plan)
    assert [i for i, c in enumerate(configs) if c.get("relay", {}).get("service")] == [0, 4]
    assert {i: relays_for(sc, i) for i in (1, 2, 3)} == {1: [4, 0], 2: [0, 4], 3: [4, 0]}
    assert all(len(c["relay"]["use"]) == 2 for i, c in enumerate(configs) if i in (1, 2, 3, 5, 6))
    assert configs[1]["network"]["neighbours"] == sc.topology.degree  # public honest relays learn: no extra slot
    assert "connect_timeout_s" not in node_configs(parse_scenario(BASE), tmp_path / "loop")[0]["transport"]
    off = _scenario(NETWORK.replace("up_mbit = 20", "up_mbit = 20\npublic_relay = false"))
    assert not any("relay" in c for c in node_configs(off, tmp_path, base_port=0,
                                                       plan=internet.plan(network_topology(off))))


@pytest.mark.parametrize(("network", "needle", "message"), [
    ("[network]\nup_mbit = 0\n", "up_mbit", "network.up_mbit: must be a finite number > 0, got 0.0"),
    ("[network]\nrelays = 1\n[[network.routers]]\nnodes = [7]\n", "nodes = [7]",
     "network.routers[0].nodes: node 7 is a relay: relays are public, leave it out"),
    ("[network]\n[[network.routers]]\nnat = \"full-cone\"\nnodes = [1]\n", "full-cone",
     "network.routers[0].nat: unknown nat 'full-cone' (expected one of eim, symmetric)"),
    ("[network]\n[[network.routers]]\nnodes = []\n", "nodes = []", "network.routers[0].nodes: must name at least one node"),
    ("[network]\n[[network.routers]]\nnodes = [7]\n", "nodes = [7]",
     "network.routers[0].nodes: node index 7 out of range (0..6)"),
    ("[network]\n[[network.routers]]\nnodes = [1]\n[[network.routers]]\nnodes = [2, 1]\n", "nodes = [2, 1]",
     "network.routers[1].nodes: node 1 is already in network.routers[0]"),
    ("[network]\n[[network.links]]\nnodes = [1]\n", "[[network.links]]",
     "network.links[0]: give up_mbit, down_mbit or both"),
    ("[network]\n[[network.routers]]\nnodes = [1, 5]\n", "nodes = [1, 5]",
     "network.routers[0].nodes: the Sybils of attacker 0 (nodes 5, 6) share one host: list all of them in one entry, or none"),
    ("[network]\n[[network.links]]\nnodes = [6]\nup_mbit = 1\n", "nodes = [6]",
     "network.links[0].nodes: the Sybils of attacker 0 (nodes 5, 6) share one host: list all of them in one entry, or none"),
    ("[network]\n[[network.routers]]\nnodes = [0, 1, 2]\n[[network.routers]]\nnodes = [3, 4, 5, 6]\n", "[network]",
     "network: nodes that cannot dial each other without a relay: 0, 1, 2; 3, 4, 5, 6 (no public node between "
     "them: leave a node out of every router to make it public, or add relays)"),
    ("[network]\n[[network.routers]]\nnodes = [0, 1, 2, 3, 4]\n[[network.routers]]\nnodes = [5, 6]\n", "[network]",
     "network: nodes that cannot dial each other without a relay: 0, 1, 2, 3, 4; 5, 6"),
])
def test_network_errors_name_line_and_field(tmp_path: Path, network: str, needle: str, message: str) -> None:
    path = tmp_path / "scenario.toml"
    path.write_text(BASE + "\n" + textwrap.dedent(network))
    with pytest.raises(ConfigError) as info:
        parse_scenario(path.read_text(), str(path))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text)
    assert str(info.value).startswith(f"{path}:{line}: {message}")


def test_check_network_refuses_with_the_reason_never_falls_back() -> None:
    no_delay = Capabilities(None, None, None, "packet sockets unavailable: EPERM")
    check_network(no_delay)  # without latency steps the delay line is not needed
    with pytest.raises(OptionError) as info:
        check_network(no_delay, latency=True)
    assert (info.value.key, info.value.problem) == (
        "network", "latency steps need the emulated internet's delay line, which cannot run here: "
                   "packet sockets unavailable: EPERM")
    with pytest.raises(OptionError) as info:
        check_network(Capabilities(None, "nft not installed (apt-get install nftables)", None, None))
    assert info.value.key == "network"
    assert info.value.problem == ("the emulated internet cannot run here: nft not installed (apt-get install "
                                  "nftables) (run as root, or remove [network] to run every node on loopback)")
