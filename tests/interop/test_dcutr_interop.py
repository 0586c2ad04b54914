"""DCUtR between murmur and js-libp2p (``@libp2p/dcutr``) on the emulated
internet: a relayed connection through a murmur relay on the public segment
upgrades to a direct one, whichever side dialled through the relay.

* js-libp2p (public) dials a murmur host behind an endpoint-independent NAT
  through the relay; murmur, inbound on the relayed connection, drives the
  upgrade (the spec's B) with a hole punch, js answers (A): murmur's
  connection is ``punched``, js holds a direct one.
* a murmur host (public) dials js-libp2p behind an endpoint-independent NAT
  through the relay (js reserved on it); js drives (B) and upgrades
  unilaterally to murmur's public address, murmur answers (A): both hold a
  direct connection.

The one deviation from stock js-libp2p, documented in
``tests/interop/js/private-ranges.mjs``: a Node module hook that drops
'198.18.0.0/15' from @libp2p/utils' private ranges at load time. The
emulated internet's public segment is that range (RFC 2544, never a real
address), and @libp2p/dcutr keeps only addresses its ``isPublicAndDialable``
accepts. Each case also runs *without* the hook, to show the filter is the
only obstacle: js never dials (its own DCUtR log says why) and the
connection stays relayed.

Not covered: js-libp2p behind a NAT as the answering side of a *punch*:
@libp2p/tcp dials from an ephemeral port (no port reuse), so its SYN leaves
its NAT from a mapping nobody observed, and the CONNECT it sends carries
only its LAN and circuit addresses (observed ones wait for AutoNAT).

Root (network namespaces) and node/npm (js-libp2p, installed into the
interop cache) are needed; the test is skipped, with the reason, without
them. The emulation is removed whatever happens.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from murmur.errors import ConnectionClosed
from murmur.protocol.identity import PeerId
from murmur.protocol.libp2p import Libp2pConnection, Libp2pHost
from murmur.protocol.libp2p.dcutr import DcutrConfig, HolePuncher
from murmur.protocol.libp2p.relay import RelayClient, RelayService
from murmur.protocol.multiaddr import DialAddr, Multiaddr
from murmur.testnet.internet import Host, Internet, Router, Topology
from tests.integration.cluster import wait_until
from tests.integration.emulation import ns_host, require_internet
from tests.interop.conftest import RemotePeer, js_libp2p_dir

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

CONNECT_TIMEOUT_S = 2.0
JS_DEBUG = "DEBUG=libp2p:dcutr*"  # js logs each DCUtR step to stderr (the RemotePeer's log): the evidence
# What @libp2p/dcutr logs when its private-range filter left nothing to dial
JS_REFUSED_AS_A = "B had no dialable multiaddrs"
JS_REFUSED_AS_B = "A did not have any dialable multiaddrs"
JS_DIALS_AS_A = "A dialing"
JS_UPGRADED_UNILATERALLY = "unilateral connection upgrade to"
_ports = itertools.count(4101)  # fresh ports for every host of every case: no TIME_WAIT or conntrack left over


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    require_internet()


@pytest.fixture(scope="module")
def js_dir() -> tuple[Path, float]:
    return js_libp2p_dir()


@pytest.fixture(scope="module")
def net() -> Iterator[Internet]:
    hosts = (Host("relay"), Host("js_public"), Host("m_public"),
             Host("m_nat", router="home_m"), Host("js_nat", router="home_js"))
    with Internet(Topology(hosts=hosts, routers=(Router("home_m"), Router("home_js")))) as emulated:
        yield emulated


def _start_js(net: Internet, host: str, js_dir: tuple[Path, float], hook: bool, *args: str) -> RemotePeer:
    target, install_s = js_dir
    argv = [*net.exec_prefix(host), "env", JS_DEBUG, "node", "--import", "./polyfill.mjs",
            *(["--import", "./private-ranges.mjs"] if hook else []), "peer.mjs", "--dcutr", *args]
    return RemotePeer(f"js-libp2p-{host}", argv, target, install_s)


def _js_log(js: RemotePeer) -> str:
    return js.log_path.read_text(errors="replace")


async def _js_connections(js: RemotePeer, peer: PeerId) -> list[dict[str, object]]:
    return list((await js.acall("connections", peer=str(peer)))["connections"])


def _direct_to(host: Libp2pHost, peer: PeerId) -> Libp2pConnection | None:
    return next((c for c in host.connections if c.peer_id == peer and c.relay is None), None)


def _relayed_to(host: Libp2pHost, peer: PeerId) -> Libp2pConnection | None:
    return next((c for c in host.connections if c.peer_id == peer and c.relay is not None), None)


async def _relay(net: Internet) -> tuple[Libp2pHost, RelayService, Multiaddr]:
    relay = ns_host(net, "relay")
    service = RelayService(relay)
    (addr,) = await relay.listen(net.address("relay"), next(_ports))
    return relay, service, addr


async def _assert_js_holds_only_relayed(js: RemotePeer, peer: PeerId) -> None:
    js_side = await _js_connections(js, peer)
    assert js_side and all("/p2p-circuit" in str(c["remote"]) for c in js_side), js_side


@pytest.mark.parametrize("hook", [True, False], ids=["public-range-hook", "stock-js"])
async def test_js_libp2p_dials_murmur_through_a_relay_and_murmur_punches_a_hole(
        net: Internet, js_dir: tuple[Path, float], hook: bool) -> None:
    relay, _, relay_addr = await _relay(net)
    m = ns_host(net, "m_nat", CONNECT_TIMEOUT_S)
    # no unilateral dial to js's public address first: the punch itself is what is shown
    punch = HolePuncher(m, DcutrConfig(unilateral=False))
    js: RemotePeer | None = None
    try:
        await m.listen(net.address("m_nat"), next(_ports))
        await RelayClient(m).reserve(await m.dial(relay_addr))  # from the listen port: the relay sees the mapping
        await wait_until(lambda: m.observed_addrs, 5, "murmur identified by the relay")
        js_addr = f"/ip4/{net.address('js_public')}/tcp/{next(_ports)}"
        js = await asyncio.to_thread(_start_js, net, "js_public", js_dir, hook, "--listen", js_addr,
                                     "--announce", js_addr)
        js_id = PeerId.from_string(js.peer_id)
        await js.acall("dial", addr=f"{relay_addr}/p2p-circuit/p2p/{m.peer_id}")
        await wait_until(lambda: _relayed_to(m, js_id), 5, "murmur holds js's relayed connection")
        relayed = _relayed_to(m, js_id)
        assert relayed is not None and not relayed.outbound
        try:
            direct = await punch.upgrade(relayed)
        except ConnectionClosed:  # js reset the DCUtR stream
            direct = None
        if hook:
            assert direct is not None and direct.punched, js.evidence()
            assert direct.remote[0] == net.address("js_public")
            (rtt,) = await m.ping(direct)
            assert rtt < 5.0
            js_side = await _js_connections(js, m.peer_id)
            assert any("/p2p-circuit" not in str(c["remote"]) for c in js_side), js_side
            assert JS_DIALS_AS_A in _js_log(js)  # js took part as A: dialled on our SYNC
            assert punch.stats["successes"] == 1
        else:
            # stock js-libp2p: murmur's CONNECT names its router's 198.18.x address, which js's
            # filter takes for private; js answers nothing and dials nothing
            assert direct is None and _direct_to(m, js_id) is None
            log = _js_log(js)
            assert JS_REFUSED_AS_A in log and JS_DIALS_AS_A not in log, js.evidence()
            await _assert_js_holds_only_relayed(js, m.peer_id)
            assert not relayed.closed  # still relayed
    finally:
        if js is not None:
            js.close()
        await punch.close()
        await m.close()
        await relay.close()


@pytest.mark.parametrize("hook", [True, False], ids=["public-range-hook", "stock-js"])
async def test_murmur_dials_js_libp2p_through_a_relay_and_js_upgrades_to_direct(
        net: Internet, js_dir: tuple[Path, float], hook: bool) -> None:
    relay, service, relay_addr = await _relay(net)
    m = ns_host(net, "m_public", CONNECT_TIMEOUT_S)
    punch = HolePuncher(m)  # serves /libp2p/dcutr: js learns so from identify and starts the upgrade
    js: RemotePeer | None = None
    try:
        await m.listen(net.address("m_public"), next(_ports))
        js_listen = f"/ip4/{net.address('js_nat')}/tcp/{next(_ports)}"
        js = await asyncio.to_thread(_start_js, net, "js_nat", js_dir, hook, "--listen", js_listen,
                                     "--circuit", str(relay_addr))
        js_id = PeerId.from_string(js.peer_id)
        await wait_until(lambda: js_id in service.reservations, 10, "js reserved on the relay")
        circuit = DialAddr.parse(f"{relay_addr}/p2p-circuit/p2p/{js_id}")
        relayed = await RelayClient(m).dial_addr(circuit)
        assert relayed.relay == relay.peer_id
        if hook:
            # js (inbound on the relayed connection) sees murmur's public address in identify and dials it
            await wait_until(lambda: _direct_to(m, js_id), 15, f"js's direct connection to murmur{js.evidence()}")
            direct = _direct_to(m, js_id)
            assert direct is not None and not direct.outbound and not direct.punched
            assert direct.remote[0] == net.plan.public_address("js_nat")  # from behind js's NAT
            (rtt,) = await m.ping(direct)
            assert rtt < 5.0
            js_side = await _js_connections(js, m.peer_id)
            assert any("/p2p-circuit" not in str(c["remote"]) for c in js_side), js_side
            assert JS_UPGRADED_UNILATERALLY in _js_log(js)
            await wait_until(lambda: relayed.closed, 10, "js closed the relayed connection after the upgrade")
        else:
            # stock js-libp2p: murmur's public 198.18.x address is private to it, so no unilateral
            # upgrade; in the DCUtR exchange it refuses murmur's CONNECT for the same reason
            await wait_until(lambda: JS_REFUSED_AS_B in _js_log(js), 20, "js's DCUtR refused murmur's addresses")
            assert _direct_to(m, js_id) is None
            assert not relayed.closed
            await _assert_js_holds_only_relayed(js, m.peer_id)
    finally:
        if js is not None:
            js.close()
        await punch.close()
        await m.close()
        await relay.close()

