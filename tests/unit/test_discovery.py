"""Bootstrap back-off, peer exchange validation, mDNS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import random

import msgpack
import pytest

from murmur.errors import ConfigError, DecodeError, LimitExceeded
from murmur.protocol.discovery import (
    BackoffPolicy,
    Bootstrap,
    MdnsConfig,
    MdnsDiscovery,
    PeerExchange,
    PeerExchangeConfig,
    backoff_delay,
    parse_bootstrap,
    parse_txt,
)
from murmur.protocol.identity import Identity, PeerId
from murmur.protocol.multiaddr import Multiaddr
from murmur.protocol.peertable import PeerTable
from tests.clocks import ManualClock

_IDS: dict[int, PeerId] = {}


def pid(i: int) -> PeerId:
    if i not in _IDS:
        _IDS[i] = Identity.from_seed((i + 900).to_bytes(32, "big")).peer_id
    return _IDS[i]


# -- bootstrap ----------------------------------------------------------------

def test_backoff_schedule_is_exponential_capped_and_jittered_within_bounds():
    policy = BackoffPolicy(initial_s=1, factor=2, max_s=60, jitter=0.2)
    assert [backoff_delay(a, policy) for a in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(10**9, policy) == 60  # no overflow
    assert backoff_delay(3, policy, u=0.0) == pytest.approx(3.2)
    assert backoff_delay(3, policy, u=0.999999) == pytest.approx(4.8, rel=1e-5)
    with pytest.raises(ValueError):
        backoff_delay(0, policy)
    assert backoff_delay(50, BackoffPolicy(factor=1.0)) == 1.0


def test_parse_bootstrap_rejects_bad_entries_as_config_errors():
    peer = pid(1)
    addrs = parse_bootstrap([f"/ip4/10.0.0.1/tcp/4001/p2p/{peer}", "/ip6/::1/tcp/4002", "/ip6/::1/tcp/4002"])
    assert [a.direct() for a in addrs] == [Multiaddr("10.0.0.1", 4001, peer), Multiaddr("::1", 4002)]
    for bad in ("10.0.0.1:4001", "/ip4/10.0.0.1/tcp/0", "/ip4/10.0.0.1/tcp/1/p2p/QmNope"):
        with pytest.raises(ConfigError):
            parse_bootstrap([bad])


def test_bootstrap_dial_schedule():
    a, b = Multiaddr("10.0.0.1", 1), Multiaddr("10.0.0.2", 2)
    boot = Bootstrap([a, b], BackoffPolicy(initial_s=1, factor=2, max_s=10, jitter=0.0), random.Random(1))
    assert boot.due(0.0) == [a, b]
    assert boot.due(0.0) == [] and boot.next_wakeup() is None  # both dialling
    assert boot.on_failure(a, 0.0) == 1.0
    boot.on_success(b)
    assert boot.due(0.5) == [] and boot.next_wakeup() == 1.0
    assert boot.due(1.0) == [a]
    assert boot.on_failure(a, 1.0) == 2.0 and boot.failures(a) == 2
    for t in (3.0, 7.0, 15.0, 25.0):
        assert boot.due(t) == [a]
        boot.on_failure(a, t)
    assert boot.next_wakeup() == 35.0  # capped at 10 s
    boot.on_disconnect(b, 40.0)
    assert set(boot.due(40.0)) == {a, b}
    boot.on_success(a)
    assert boot.failures(a) == 0


# -- peer exchange ------------------------------------------------------------

def make_table(clock: ManualClock) -> PeerTable:
    table = PeerTable(clock=clock, self_id=pid(0))
    for i in range(1, 21):
        table.observe(pid(i), [Multiaddr(f"10.0.{i}.1", 4000)])
    for i in range(21, 31):
        table.add(pid(i), [Multiaddr(f"10.1.{i}.1", 4000)])  # hearsay only
    table.penalise(pid(1), 1000)  # banned
    table.mark_failure(pid(2))
    return table


def test_choose_shares_only_seen_unbanned_reachable_peers_at_random():
    clock = ManualClock(100.0)
    table = make_table(clock)
    pex = PeerExchange(pid(0), PeerExchangeConfig(max_peers=8))
    rng = random.Random(5)
    seen: set[PeerId] = set()
    for _ in range(30):
        chosen = pex.choose(table, 50, rng, exclude=[pid(3)])
        assert len(chosen) == 8  # capped by config
        seen |= {p for p, _ in chosen}
    assert seen == {pid(i) for i in range(4, 21)}  # not 1 (banned), 2 (failing), 3 (requester), 21+ (hearsay)


def test_validate_roundtrip_drops_self_and_banned():
    clock = ManualClock(100.0)
    table = make_table(clock)
    pex = PeerExchange(pid(0))
    entries = [(pid(0), (Multiaddr("10.9.9.9", 1),)), (pid(1), (Multiaddr("10.9.9.8", 1),)),
               (pid(50), (Multiaddr("10.9.9.7", 1), Multiaddr("::1", 2)))]
    raw = msgpack.unpackb(msgpack.packb(PeerExchange.to_wire(entries)))
    got = pex.validate(raw, table.is_banned)
    assert got == [(pid(50), (Multiaddr("10.9.9.7", 1), Multiaddr("::1", 2)))]


def test_validate_rejects_oversized_and_malformed_responses():
    pex = PeerExchange(pid(0), PeerExchangeConfig(max_peers=4, max_addrs_per_peer=2))
    ok = (pid(7).raw, ["/ip4/10.0.0.1/tcp/1"])
    never = lambda _p: False  # noqa: E731
    assert len(pex.validate([ok, ok], never)) == 1  # duplicates collapse
    with pytest.raises(LimitExceeded):
        pex.validate([ok] * 5, never)
    with pytest.raises(LimitExceeded):
        pex.validate([ok] * 3, never, requested=2)
    with pytest.raises(LimitExceeded):
        pex.validate([(pid(7).raw, ["/ip4/10.0.0.1/tcp/1", "/ip4/10.0.0.1/tcp/2", "/ip4/10.0.0.1/tcp/3"])], never)
    for bad in ({"a": 1}, [ok[0]], [(b"\x00\x01", ok[1])], [(pid(7).raw, ["nonsense"])], [(pid(7).raw, [])]):
        with pytest.raises(DecodeError):
            pex.validate(bad, never)


# -- mDNS ---------------------------------------------------------------------

def test_parse_txt_record():
    peer = pid(3)
    props = {b"id": peer.text.encode(), b"a0": b"/ip4/10.0.0.1/tcp/4001", b"a1": b"/ip6/::1/tcp/4001", b"x": b"?"}
    assert parse_txt(props, 4001, []) == (peer, (Multiaddr("10.0.0.1", 4001), Multiaddr("::1", 4001)))
    assert parse_txt({b"id": peer.text.encode()}, 4002, ["192.0.2.9"]) == (peer, (Multiaddr("192.0.2.9", 4002),))
    with pytest.raises(DecodeError):
        parse_txt({}, 1, ["10.0.0.1"])
    with pytest.raises(ValueError):
        parse_txt({b"id": b"QmNotOurs"}, 1, ["10.0.0.1"])
    with pytest.raises(DecodeError):
        parse_txt({b"id": peer.text.encode(), b"a0": b"/ip4/10.0.0.1/tcp/1/p2p/" + pid(4).text.encode()}, 1, [])


async def test_mdns_is_off_by_default_and_does_nothing():
    found: list[PeerId] = []
    async with MdnsDiscovery(pid(1), [Multiaddr("127.0.0.1", 1)], lambda p, a: found.append(p)) as mdns:
        assert mdns._zc is None
    assert found == []


async def test_mdns_two_nodes_find_each_other_on_loopback():
    config = MdnsConfig(enabled=True, interfaces=("127.0.0.1",))
    a, b = Identity.generate().peer_id, Identity.generate().peer_id  # fresh names: no stale caches
    found: asyncio.Queue[tuple[str, PeerId, tuple[Multiaddr, ...]]] = asyncio.Queue()
    first = MdnsDiscovery(a, [Multiaddr("127.0.0.1", 4101)], lambda p, ad: found.put_nowait(("a", p, ad)), config)
    second = MdnsDiscovery(b, [Multiaddr("127.0.0.1", 4102)], lambda p, ad: found.put_nowait(("b", p, ad)), config)
    try:
        await first.start()
        await second.start()
    except OSError as exc:
        await first.close()
        await second.close()
        pytest.skip(f"zeroconf cannot open multicast sockets on loopback here: {exc}")
    try:
        got: dict[str, tuple[PeerId, tuple[Multiaddr, ...]]] = {}
        while len(got) < 2:
            who, peer, addrs = await asyncio.wait_for(found.get(), timeout=15)
            got[who] = (peer, addrs)
        assert got["a"] == (b, (Multiaddr("127.0.0.1", 4102),))
        assert got["b"] == (a, (Multiaddr("127.0.0.1", 4101),))
    finally:
        await first.close()
        await second.close()
    late = [found.get_nowait() for _ in range(found.qsize())]
    assert all(peer == {"a": b, "b": a}[who] for who, peer, _ in late)  # nobody ever reports itself


async def test_mdns_flood_of_made_up_services_is_resolved_a_few_at_a_time():
    """Anyone on the link can announce services: 40 packets naming 2000
    made-up ones had 1900 resolves under way at once and the node multicast
    ~3800 queries. At most MAX_RESOLVING are resolved at once; the rest are
    passed over until announced again."""
    import socket

    from zeroconf import DNSOutgoing, DNSPointer, ServiceBrowser, ServiceStateChange
    from zeroconf import const

    from murmur.protocol.discovery import MAX_RESOLVING, SERVICE_TYPE

    names = [f"fake{i}-{random.getrandbits(32)}.{SERVICE_TYPE}" for i in range(10 * MAX_RESOLVING)]
    me = Identity.generate().peer_id
    mdns = MdnsDiscovery(me, [Multiaddr("127.0.0.1", 4103)], lambda p, a: None,
                         MdnsConfig(enabled=True, interfaces=("127.0.0.1",)))
    seen: set[str] = set()  # what the node's zeroconf read, through a second browser of ours

    def saw(zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        seen.add(name)

    # no skip: loopback multicast works wherever CI runs, and a skip would prove nothing
    async with mdns, contextlib.AsyncExitStack() as stack:
        browser = ServiceBrowser(mdns._zc.zeroconf, SERVICE_TYPE, handlers=[saw])
        stack.callback(browser.cancel)
        sender = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
        for name in names:
            out.add_answer_at_time(DNSPointer(SERVICE_TYPE, const._TYPE_PTR, const._CLASS_IN, 4500, name), 0)
        for packet in out.packets():
            sender.sendto(packet, ("224.0.0.251", 5353))
        for _ in range(500):  # until the node read every announcement (bounded: 5 s)
            if seen >= set(names):
                break
            await asyncio.sleep(0.01)
        assert seen >= set(names)
        # Each resolve waits resolve_timeout_ms (3 s) for answers nobody sends: all still under way.
        resolving = [t for t in asyncio.all_tasks() if t.get_name().startswith(f"mdns:{me.short()}:resolve:")]
        assert len(resolving) <= MAX_RESOLVING
        assert mdns.passed_over >= len(names) - MAX_RESOLVING
