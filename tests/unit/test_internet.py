"""The emulated internet's plan and command lines (pure), and its runner.
Real namespaces, NATs and rates: tests/integration/test_internet.py."""

from __future__ import annotations

import ipaddress
import logging
import os
import subprocess

import pytest

from murmur.testnet import internet
from murmur.testnet.internet import Host, InternetError, LinkRate, NatKind, Router, Topology, Unsolicited

OWNER = "4242.17.0"
NS = f"murmur-net-{OWNER}-"


def _topology() -> Topology:
    return Topology(
        hosts=(Host("pub"), Host("a", router="home"), Host("b", router="home", rate=LinkRate(5, 20)),
               Host("c", router="cgn")),
        routers=(Router("home"), Router("cgn", nat=NatKind.SYMMETRIC, lan="192.168.1.0/24")),
    )


def test_plan_gives_each_public_endpoint_its_own_24_and_lans_their_own_range() -> None:
    p = internet.plan(_topology(), owner=OWNER)
    assert p.inet_ns == f"{NS}inet"
    # routers take public addresses first, then public hosts, one /24 each
    assert (p.routers["home"].wan_address, p.routers["cgn"].wan_address) == ("198.18.1.1", "198.18.2.1")
    assert p.hosts["pub"].address == "198.18.3.1" and p.hosts["pub"].prefix_len == 15
    assert p.hosts["pub"].gateway is None and p.hosts["pub"].far_ns == p.inet_ns
    a, b, c = p.hosts["a"], p.hosts["b"], p.hosts["c"]
    assert (a.address, b.address, a.gateway, a.prefix_len) == ("10.1.0.2", "10.1.0.3", "10.1.0.1", 24)
    assert (c.address, c.gateway) == ("192.168.1.2", "192.168.1.1")
    assert (a.ns, a.far_ns, a.far_iface, b.far_iface) == (f"{NS}h-a", f"{NS}r-home", "p1", "p2")
    assert p.public_address("a") == "198.18.1.1" and p.public_address("pub") == "198.18.3.1"
    assert p.namespaces == [f"{NS}h-pub", f"{NS}h-a", f"{NS}h-b", f"{NS}h-c", f"{NS}r-home", f"{NS}r-cgn", f"{NS}inet"]
    for ns in p.namespaces:
        assert internet._OWNED.match(ns)


def test_explicit_public_addresses_are_kept_and_skipped_by_the_automatic_ones() -> None:
    p = internet.plan(Topology(hosts=(Host("x", address="198.18.1.1"), Host("y"), Host("z", address="198.19.0.7"))),
                      owner=OWNER)
    assert [p.hosts[h].address for h in "xyz"] == ["198.18.1.1", "198.18.2.1", "198.19.0.7"]


@pytest.mark.parametrize(("topology", "problem"), [
    (Topology(hosts=(Host("a"), Host("a"))), "host name 'a' is used twice"),
    (Topology(hosts=(Host("a"),), routers=(Router("a"),)), "host name 'a' is used twice"),
    (Topology(hosts=(Host("Bad Name"),)), "host name 'Bad Name' must match"),
    (Topology(hosts=(Host("a", router="nope"),)), "host a: no router named 'nope'"),
    (Topology(hosts=(Host("a", address="192.0.2.1"),)), "a: 192.0.2.1 is not a host address in the public segment"),
    (Topology(hosts=(Host("a", address="198.18.0.0"),)), "not a host address in the public segment"),
    (Topology(hosts=(Host("a", address="198.18.5.5"), Host("b", address="198.18.5.5"))), "the same address"),
    (Topology(hosts=(Host("a", router="r", address="198.18.9.9"),), routers=(Router("r"),)),
     "only public hosts take an address"),
    (Topology(hosts=(), routers=(Router("r", lan="8.8.8.0/24"),)), "lan 8.8.8.0/24 must be a /29 or larger inside"),
    (Topology(hosts=(), routers=(Router("r", lan="198.18.0.0/24"),)), "must be a /29 or larger"),
    (Topology(hosts=(), routers=(Router("r", lan="10.0.0.0/30"),)), "must be a /29 or larger"),
    (Topology(hosts=tuple(Host(f"h{i}", router="r") for i in range(6)), routers=(Router("r", lan="10.0.0.0/29"),)),
     "lan 10.0.0.0/29 has no room for host h5"),
    (Topology(hosts=tuple(Host(f"h{i}") for i in range(internet.MAX_PUBLIC_ENDPOINTS + 1))),
     "more than 511 public endpoints"),
])
def test_plan_refuses_what_cannot_be_built(topology: Topology, problem: str) -> None:
    with pytest.raises(InternetError, match=problem.replace("(", r"\(")):
        internet.plan(topology, owner=OWNER)


def test_every_automatic_address_is_inside_the_benchmarking_range() -> None:
    p = internet.plan(Topology(hosts=tuple(Host(f"h{i}") for i in range(internet.MAX_PUBLIC_ENDPOINTS))), owner=OWNER)
    addrs = [ipaddress.IPv4Address(h.address) for h in p.hosts.values()]
    assert len(set(addrs)) == internet.MAX_PUBLIC_ENDPOINTS
    assert all(a in internet.PUBLIC_NET for a in addrs)
    assert len({ipaddress.IPv4Network(f"{a}/24", strict=False) for a in addrs}) == len(addrs)


def test_link_rates_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        LinkRate(up_mbit=0)


def test_nat_rules_masquerade_out_and_drop_unsolicited_in() -> None:
    p = internet.plan(_topology(), owner=OWNER)
    nft = ["ip", "netns", "exec", f"{NS}r-home", "nft"]
    eim = internet.nat_commands(p.routers["home"])
    assert eim[2] == [*nft, "add", "rule", "ip", "murmur", "postrouting", "oifname", "wan0", "masquerade"]
    assert [*nft, "add", "rule", "ip", "murmur", "forward", "iifname", "wan0", "drop"] in eim
    assert [*nft, "add", "rule", "ip", "murmur", "input", "iifname", "wan0", "drop"] in eim
    symmetric = internet.nat_commands(p.routers["cgn"])
    assert symmetric[2][-3:] == ["wan0", "masquerade", "random"]
    rejecting = internet.plan(Topology(hosts=(), routers=(Router("r", unsolicited=Unsolicited.REJECT),)),
                              owner=OWNER).routers["r"]
    rules = [c[c.index("wan0") + 1:] for c in internet.nat_commands(rejecting) if c[-1] != "accept" and "iifname" in c]
    assert rules == [["meta", "l4proto", "tcp", "reject", "with", "tcp", "reset"], ["reject"]] * 2


def test_loss_drops_a_share_of_what_enters_each_end_of_the_cable_and_zero_removes_it() -> None:
    b = internet.plan(_topology(), owner=OWNER).hosts["b"]
    router, host = ["ip", "netns", "exec", f"{NS}r-home", "nft"], ["ip", "netns", "exec", f"{NS}h-b", "nft"]

    def side(nft: list[str], iface: str) -> list[list[str]]:
        table = f"murmur_loss_{iface}"
        return [
            ["-", *nft, "delete", "table", "netdev", table],  # the previous setting, if any
            [*nft, "add", "table", "netdev", table],
            [*nft, "add", "chain", "netdev", table, "ingress",
             f"{{ type filter hook ingress device {iface} priority filter ; policy accept ; }}"],
            [*nft, "add", "rule", "netdev", table, "ingress", "numgen", "random", "mod", "10000", "<", "250", "drop"],
        ]

    # what b sends, at the router's end of its cable (port p2); what it receives, at its eth0
    assert internet.loss_commands(b, 2.5) == side(router, "p2") + side(host, "eth0")
    assert internet.loss_commands(b, 100.0)[3][-2:] == ["10000", "drop"]
    assert internet.loss_commands(b, 0.0) == [side(router, "p2")[0], side(host, "eth0")[0]]
    assert internet.loss_commands(b, 0.001) == internet.loss_commands(b, 0.0)  # below what a draw can say
    for bad in (-1.0, 100.5, float("nan")):
        with pytest.raises(InternetError):
            internet.loss_commands(b, bad)


def test_rates_shape_upload_at_the_host_and_download_at_the_far_end() -> None:
    b = internet.plan(_topology(), owner=OWNER).hosts["b"]
    cmds = internet.rate_commands(b, LinkRate(up_mbit=5, down_mbit=20))
    assert cmds == [
        ["tc", "-n", f"{NS}h-b", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "5000kbit",
         "burst", "32768", "latency", "50ms"],
        ["tc", "-n", f"{NS}r-home", "qdisc", "replace", "dev", "p2", "root", "tbf", "rate", "20000kbit",
         "burst", "32768", "latency", "50ms"],
    ]
    assert internet.tbf_burst_bytes(1000) == 500_000  # 4 ms of a gigabit
    assert internet.rate_commands(b, LinkRate()) == [
        ["-", "tc", "-n", f"{NS}h-b", "qdisc", "del", "dev", "eth0", "root"],
        ["-", "tc", "-n", f"{NS}r-home", "qdisc", "del", "dev", "p2", "root"],
    ]


def test_setup_creates_nothing_in_the_machines_own_namespace() -> None:
    """Every command names a namespace it runs in, except ``ip netns add``:
    no interface, address, route or rule lands next to the real ones."""
    cmds = internet.setup_commands(internet.plan(_topology(), owner=OWNER))
    for cmd in cmds:
        inside = cmd[:2] == ["ip", "-n"] or cmd[:3] == ["ip", "netns", "exec"] or cmd[:2] == ["tc", "-n"]
        assert inside or cmd[:3] == ["ip", "netns", "add"], cmd
        assert all(NS in part for part in cmd if part.startswith("murmur-net-")), cmd
    veths = [c for c in cmds if "veth" in c]
    assert len(veths) == 6 and all(c[-2] == "netns" and c[-1].startswith(NS) for c in veths)
    # only hosts behind a router get a default route, and nobody else routes anywhere
    routes = [c for c in cmds if "route" in c]
    assert sorted(c[2] for c in routes) == [f"{NS}h-a", f"{NS}h-b", f"{NS}h-c"]
    assert all(c[-3:] == ["default", "via", "10.1.0.1"] or c[-1] == "192.168.1.1" for c in routes)
    # one rate in setup: b's (no qdisc to delete yet)
    assert sum(1 for c in cmds if "tbf" in c) == 2 and not any(c[0] == "-" for c in cmds)


def test_run_stops_at_the_first_failure_unless_the_command_may_fail() -> None:
    seen: list[list[str]] = []

    def runner(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 2 if cmd[-1] == "x" else 0, "", "boom")

    with pytest.raises(InternetError, match=r"^bad x: exit 2: boom$"):
        internet.run([["ok"], ["-", "fine", "x"], ["bad", "x"], ["never"]], runner)
    assert seen == [["ok"], ["fine", "x"], ["bad", "x"]]


def test_owner_tag_names_this_process_and_tells_a_dead_owner() -> None:
    owner = internet.new_owner()
    pid, ticks, _n = owner.split(".")
    assert int(pid) == os.getpid() and int(ticks) > 0
    assert internet.new_owner() != owner  # each instance its own
    assert internet._process_start_ticks(os.getpid()) == int(ticks)


def test_probe_reports_honestly() -> None:
    caps = internet.probe()
    if os.geteuid() != 0:
        assert caps.internet is not None and "root" in caps.internet
        return
    # as root: whatever it says must match what this host really allows, and it leaves nothing behind
    ns_ok = subprocess.run(["ip", "netns", "add", "murmur-test-probe"], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", "murmur-test-probe"], capture_output=True)
    assert (caps.netns is None) == ns_ok
    assert not [n for n in internet.owned_namespaces() if n.endswith("-probe")]


def test_skipped_is_a_clear_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="murmur.testnet.internet"):
        internet.skipped("loss 5% on node3", "nodes share the loopback interface")
    assert caplog.messages == ["skipped: loss 5% on node3: nodes share the loopback interface"]


def _wired() -> internet.Plan:
    """``pub`` and ``b`` (behind home) get delay lines; the others plain cables."""
    return internet.plan(Topology(
        hosts=(Host("pub", delay_line=True), Host("pub2"), Host("a", router="home"),
               Host("b", router="home", delay_line=True), Host("c", router="home", delay_line=True)),
        routers=(Router("home"),)), owner=OWNER)


def test_only_hosts_planned_with_a_delay_line_get_a_wire_named_after_their_port() -> None:
    p = _wired()
    assert {n: h.wire for n, h in p.hosts.items()} == {
        "pub": internet.Wire("p2h", "p2b"), "pub2": None, "a": None,
        "b": internet.Wire("p2h", "p2b"), "c": internet.Wire("p3h", "p3b")}
    # the same names in two namespaces, never twice in one
    assert (p.hosts["pub"].far_ns, p.hosts["b"].far_ns) == (f"{NS}inet", f"{NS}r-home")
    most = internet.wire_for(f"p{internet.MAX_PUBLIC_ENDPOINTS}")
    assert max(len(most.host_side), len(most.bridge_side)) <= internet.IFNAME_MAX


def test_a_wired_cable_splices_the_delay_lines_ends_between_eth0_and_the_bridge_port() -> None:
    cmds = internet.setup_commands(_wired())
    far, b = ["ip", "-n", f"{NS}r-home"], ["ip", "-n", f"{NS}h-b"]
    nft = ["ip", "netns", "exec", f"{NS}r-home", "nft"]
    start = cmds.index([*b, "link", "add", "eth0", "type", "veth", "peer", "name", "p2h", "netns", f"{NS}r-home"])
    assert cmds[start:start + 10] == [
        [*b, "link", "add", "eth0", "type", "veth", "peer", "name", "p2h", "netns", f"{NS}r-home"],
        [*far, "link", "add", "p2b", "type", "veth", "peer", "name", "p2"],
        [*nft, "add", "table", "netdev", "murmur_wire_p2"],
        [*nft, "add", "chain", "netdev", "murmur_wire_p2", "p2h",
         "{ type filter hook ingress device p2h priority filter ; policy drop ; }"],
        [*nft, "add", "chain", "netdev", "murmur_wire_p2", "p2b",
         "{ type filter hook ingress device p2b priority filter ; policy drop ; }"],
        [*far, "link", "set", "p2", "master", "lan0"],  # the bridge port keeps its name: rate and loss apply
        [*far, "link", "set", "p2", "up"],
        [*far, "link", "set", "p2b", "up"],
        [*far, "link", "set", "p2h", "up"],
        [*b, "link", "set", "eth0", "up"],
    ]
    # a is cabled as ever: its eth0's peer is its bridge port
    assert ["ip", "-n", f"{NS}h-a", "link", "add", "eth0", "type", "veth", "peer", "name", "p1", "netns",
            f"{NS}r-home"] in cmds
    assert sum(1 for c in cmds if "veth" in c) == 6 + 3  # a pair per host and router, a second per wired host
    # loss and rate still act on the bridge port and on eth0
    b_plan = _wired().hosts["b"]
    assert [c[-1].split()[6] for c in internet.loss_commands(b_plan, 1.0) if "chain" in c] == ["p2", "eth0"]
    assert [c[6] for c in internet.rate_commands(b_plan, LinkRate(1, 2))] == ["eth0", "p2"]


def test_one_delay_line_per_far_namespace_carries_its_wired_hosts() -> None:
    lines = internet.delay_line_commands(_wired(), python="/py")
    assert lines == {
        f"{NS}inet": ["ip", "netns", "exec", f"{NS}inet", "/py", "-m", "murmur.testnet.delayline",
                      "--link", "pub:p2h:p2b"],
        f"{NS}r-home": ["ip", "netns", "exec", f"{NS}r-home", "/py", "-m", "murmur.testnet.delayline",
                        "--link", "b:p2h:p2b", "--link", "c:p3h:p3b"],
    }
    assert internet.delay_line_commands(internet.plan(_topology(), owner=OWNER)) == {}  # nobody pays for none


def test_latency_is_one_way_each_way_and_only_on_a_wired_host() -> None:
    p = _wired()
    assert internet.latency_command(p.hosts["b"], 40.0).line() == "set b 40 40\n"
    with pytest.raises(InternetError, match=r"host a has no delay line \(plan it with Host\(..., delay_line=True\)\)"):
        internet.latency_command(p.hosts["a"], 40.0)
    with pytest.raises(InternetError, match="host b: a delay must be 0-60000 ms, got -1"):
        internet.latency_command(p.hosts["b"], -1.0)
