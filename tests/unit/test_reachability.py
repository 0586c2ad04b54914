"""A node's own addresses (scope, what a wildcard advertises) and its
reachability tracker: local addresses, observed addresses, dial-backs."""

from __future__ import annotations

import pytest

from murmur.protocol.addresses import Scope, advertised, interface_hosts, scope
from murmur.protocol.identity import Identity
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.reachability import Basis, Reachability, ReachabilityConfig, ReachabilityTracker

PEER = Identity.generate().peer_id


@pytest.mark.parametrize(("host", "expected"), [
    ("8.8.8.8", Scope.PUBLIC), ("198.18.3.1", Scope.PUBLIC), ("192.0.2.2", Scope.PUBLIC), ("2001:db8::1", Scope.PUBLIC),
    ("100.64.1.2", Scope.SHARED), ("10.1.0.2", Scope.PRIVATE), ("172.31.255.1", Scope.PRIVATE),
    ("192.168.1.5", Scope.PRIVATE), ("fd12::5", Scope.PRIVATE), ("::ffff:192.168.1.5", Scope.PRIVATE),
    ("169.254.3.3", Scope.LINK_LOCAL), ("fe80::1%eth0", Scope.LINK_LOCAL), ("127.0.0.1", Scope.LOOPBACK),
    ("::1", Scope.LOOPBACK), ("0.0.0.0", Scope.UNSPECIFIED), ("::", Scope.UNSPECIFIED),
    ("172.32.0.1", Scope.PUBLIC),
])
def test_scope(host: str, expected: Scope) -> None:
    assert scope(host) is expected


def _interfaces(v4: list[str], v6: list[str] = ()):  # noqa: ANN202 - a fake of interface_hosts
    return lambda version: v4 if version == 4 else list(v6)


def test_a_wildcard_advertises_interface_addresses_public_first_never_loopback() -> None:
    fake = _interfaces(["127.0.0.1", "10.1.0.2", "169.254.9.9", "198.18.3.1", "100.64.0.9", "10.1.0.2"],
                       ["::1", "fe80::1", "2001:db8::7", "fd00::2"])
    got = advertised(Multiaddr("0.0.0.0", 4731, PEER), fake)
    assert got == [Multiaddr("198.18.3.1", 4731, PEER), Multiaddr("100.64.0.9", 4731, PEER),
                   Multiaddr("10.1.0.2", 4731, PEER)]
    assert advertised(Multiaddr("::", 5, None), fake) == [Multiaddr("2001:db8::7", 5), Multiaddr("fd00::2", 5)]


def test_a_concrete_address_is_advertised_as_it_is_and_loopback_only_when_nothing_else() -> None:
    fake = _interfaces(["10.0.0.1"])
    assert advertised(Multiaddr("127.0.0.1", 9, PEER), fake) == [Multiaddr("127.0.0.1", 9, PEER)]
    assert advertised(Multiaddr("0.0.0.0", 9), _interfaces(["127.0.0.1"])) == [Multiaddr("127.0.0.1", 9)]
    assert advertised(Multiaddr("::", 9), _interfaces([], ["::1", "fe80::2"])) == [Multiaddr("::1", 9)]


def test_interface_hosts_reads_this_machine() -> None:
    v4 = interface_hosts(4)
    assert "127.0.0.1" in v4  # every Linux machine has loopback up
    assert all(scope(h) is not None for h in v4 + interface_hosts(6))


# ---------------------------------------------------------------- tracker


def _tracker(**kw: float) -> ReachabilityTracker:
    return ReachabilityTracker(ReachabilityConfig(**kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(("local", "expected"), [
    ([], (Reachability.UNKNOWN, Basis.NONE)),
    (["127.0.0.1"], (Reachability.PRIVATE, Basis.INTERFACES)),
    (["10.1.0.2"], (Reachability.PRIVATE, Basis.INTERFACES)),
    (["100.64.0.2"], (Reachability.PRIVATE, Basis.INTERFACES)),
    (["10.1.0.2", "198.18.1.1"], (Reachability.PUBLIC, Basis.INTERFACES)),
])
def test_local_addresses_suggest_a_state(local: list[str], expected: tuple[Reachability, Basis]) -> None:
    t = _tracker()
    t.set_local([Multiaddr(h, 1, PEER) for h in local])
    assert t.state(0.0) == expected


def test_an_observed_address_is_confirmed_by_distinct_subnets_only() -> None:
    t = _tracker(confirmations=3)
    mapped = Multiaddr("198.18.1.1", 40000)
    for i in range(10):  # a crowd in one /24: one subnet
        assert t.observe(mapped, f"sybil{i}", f"198.18.7.{i + 1}", 0.0)
    t.observe(mapped, "p1", "198.18.8.1", 0.0)
    assert t.confirmed(0.0) == []
    t.observe(mapped, "p2", "198.18.9.1", 0.0)
    assert t.confirmed(0.0) == [mapped]
    # observations never decide reachability: a private node stays private
    t.set_local([Multiaddr("10.1.0.2", 4731)])
    assert t.state(0.0) == (Reachability.PRIVATE, Basis.INTERFACES)


def test_each_observer_has_one_vote_and_votes_expire() -> None:
    t = _tracker(confirmations=2, ttl_s=10.0)
    real, fake = Multiaddr("198.18.1.1", 4731), Multiaddr("198.18.99.1", 1)
    t.observe(real, "a", "198.18.2.1", 0.0)
    t.observe(real, "b", "198.18.3.1", 1.0)
    assert t.confirmed(1.0) == [real]
    t.observe(fake, "b", "198.18.3.1", 2.0)  # b changes its story: its earlier vote goes
    assert t.confirmed(2.0) == []
    t.observe(fake, "c", "198.18.4.1", 5.0)
    assert t.confirmed(5.0) == [fake]
    assert t.confirmed(11.5) == [fake]  # a's vote expired
    assert t.confirmed(12.5) == []  # b's too; c's alone is not enough
    assert t.snapshot(12.5)["observers"] == 1


def test_the_number_of_votes_is_bounded() -> None:
    t = _tracker(confirmations=1, max_votes=8)
    for i in range(1000):
        t.observe(Multiaddr(f"198.18.{i % 250}.{i // 250 + 1}", 1000 + i), f"p{i}", f"198.19.{i % 250}.1", float(i))
    assert len(t.confirmed(1000.0)) == 8 and t.snapshot(1000.0)["observers"] == 8


def test_observations_nobody_could_dial_or_from_nowhere_do_not_count() -> None:
    t = _tracker(confirmations=1)
    for addr in (Multiaddr("127.0.0.1", 5), Multiaddr("169.254.0.1", 5), Multiaddr("0.0.0.0", 5),
                 Multiaddr("198.18.1.1", 0)):
        assert not t.observe(addr, "p", "198.18.2.1", 0.0)
    assert not t.observe(Multiaddr("198.18.1.1", 5), "p", "not an ip", 0.0)
    assert t.confirmed(0.0) == [] and t.snapshot(0.0)["observers"] == 0


def test_dial_backs_from_distinct_subnets_decide_the_state() -> None:
    t = _tracker(autonat_confirmations=2, ttl_s=100.0)
    t.set_local([Multiaddr("10.1.0.2", 4731)])
    mine = Multiaddr("198.18.1.1", 4731)
    t.record_dial_back(mine, True, "s1", "198.18.2.1", 0.0)
    t.record_dial_back(mine, True, "s2", "198.18.2.9", 0.0)  # same /24: one voice
    assert t.state(0.0) == (Reachability.PRIVATE, Basis.INTERFACES)
    t.record_dial_back(mine, True, "s3", "198.18.3.1", 0.0)
    assert t.state(0.0) == (Reachability.PUBLIC, Basis.AUTONAT)
    assert t.state(101.0) == (Reachability.PRIVATE, Basis.INTERFACES)  # results expire


def test_failed_dial_backs_make_a_public_looking_node_private_unless_one_reached_it() -> None:
    t = _tracker(autonat_confirmations=2)
    t.set_local([Multiaddr("198.18.1.1", 4731)])  # a public address, behind a firewall
    mine = Multiaddr("198.18.1.1", 4731)
    t.record_dial_back(mine, False, "s1", "198.18.2.1", 0.0)
    t.record_dial_back(mine, False, "s2", "198.18.3.1", 0.0)
    assert t.state(0.0) == (Reachability.PRIVATE, Basis.AUTONAT)
    t.record_dial_back(mine, True, "s3", "198.18.4.1", 0.0)
    assert t.state(0.0) == (Reachability.PUBLIC, Basis.INTERFACES)  # undecided: back to the guess
    t.record_dial_back(mine, False, "bad", "nowhere", 0.0)  # no subnet: ignored
    assert t.snapshot(0.0) == {"state": "public", "basis": "interfaces", "observed": [], "observers": 0}


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        ReachabilityConfig(confirmations=0)
