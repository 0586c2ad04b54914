"""``murmur peers`` on a terminal shows what each peer's identify said."""

from __future__ import annotations

from murmur.node.render import render_peers, render_status
from murmur.node.stalls import HELD_BACK_STREAK

MURMUR_PEER = {
    "peer_id": "12D3KooWMurmurPeerAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "addrs": ["/ip4/10.0.0.2/tcp/4731"],
    "score": 1.5, "connected": True, "murmur": True, "neighbour": True, "agent": "murmur/0.1.0",
    "protocols": ["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/murmur/hello/1.0.0"],
    "listen_addrs": ["/ip4/10.0.0.2/tcp/4731"], "observed": "/ip4/10.0.0.1/tcp/51000",
}
LIBP2P_PEER = {
    "peer_id": "12D3KooWJsPeerBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB", "addrs": ["/ip4/10.0.0.3/tcp/4001"],
    "score": 0.0, "connected": True, "murmur": False, "neighbour": False, "agent": "js-libp2p/2.8.0",
    "protocols": ["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"], "listen_addrs": [], "observed": "/ip4/10.0.0.1/tcp/51001",
}


def test_peers_table_shows_agent_protocols_and_observed_address() -> None:
    lines = render_peers([LIBP2P_PEER, MURMUR_PEER]).splitlines()
    assert lines[0].split() == ["peer", "connected", "neighbour", "score", "agent", "protocols", "observed-us", "addresses"]
    murmur_row, libp2p_row = lines[1].split(), lines[2].split()  # the neighbour first
    assert murmur_row[4:8] == ["murmur/0.1.0", "3", "murmur", "/ip4/10.0.0.1/tcp/51000"]
    assert libp2p_row[4:7] == ["js-libp2p/2.8.0", "2", "/ip4/10.0.0.1/tcp/51001"]
    assert lines[-1] == "2 known, 2 connected, 1 neighbours"


def test_a_peer_not_yet_identified_prints_dashes() -> None:
    row = render_peers([{"peer_id": "12D3KooWQuietCCCCCCCCCC", "addrs": [], "connected": False}]).splitlines()[1]
    assert row.split()[4:8] == ["–", "–", "–", "–"]


def _privacy_line(stage: dict) -> str:
    status = {"peer_id": "p", "learning": {"round": 100, "epsilon_budget": 10.0, "epsilon_spent": 10.0,
                                           "delta": 1e-5, "privacy": stage}}
    return next(line for line in render_status(status).splitlines() if line.startswith("privacy"))


def test_status_says_when_privacy_noise_drowns_the_learning_and_rounds_fell_back() -> None:
    """What the log WARNs at start shows in ``murmur status`` too: the run's
    noise-to-signal, and how many rounds went out with the fallback noise."""
    bad = _privacy_line({"noise_to_signal": 14.3, "fallback_rounds": 100, "rounds_sent": 100})
    assert "noise-to-signal 14 (the noise outweighs the learning: see the log)" in bad
    assert "100 of 100 rounds with fallback noise (too few edges)" in bad
    fine = _privacy_line({"noise_to_signal": 0.068, "fallback_rounds": 0, "rounds_sent": 100})
    assert fine.endswith("(δ = 1e-05), noise-to-signal 0.068")
    assert _privacy_line({}).endswith("(δ = 1e-05)")  # a node without a model size to judge by
    edgeless = _privacy_line({"noise_to_signal": 0.068, "fallback_rounds": 3, "rounds_sent": 100,
                              "neighbours_without_edge": 1})
    assert edgeless.endswith("3 of 100 rounds with fallback noise (too few edges), "
                             "1 neighbours without a noise edge (they run no privacy)")
    exposed = _privacy_line({"noise_to_signal": 0.068, "colluders": 0, "epsilon_against": {"1": 13.93, "2": 57.404}})
    assert exposed.endswith("noise-to-signal 0.068; ε of the run against colluding nodes (the budget holds "
                            "against 0): 13.9 with 1, 57.4 with 2")


def test_status_names_the_aggregator_and_says_when_the_node_is_held_back() -> None:
    """A node behind neighbours it may not follow says so in ``murmur status``
    from the round its log WARNs, not before (a round or two behind is normal)."""
    def lines(learning: dict) -> list[str]:
        return render_status({"peer_id": "p", "learning": {"round": 40, **learning}}).splitlines()

    quiet = lines({"aggregator": "sybilwall", "rounds_held_back": HELD_BACK_STREAK - 1})
    assert ["aggregator", "sybilwall"] in [line.split() for line in quiet]
    assert not [line for line in quiet if line.startswith("HELD BACK")]
    (held,) = [line for line in lines({"rounds_held_back": HELD_BACK_STREAK}) if line.startswith("HELD BACK")]
    assert f"{HELD_BACK_STREAK} rounds behind neighbours it never gave weight" in held


def test_peers_table_says_which_peers_are_banned_and_for_how_long() -> None:
    """A banned peer is refused and never dialled; the table said only "no"
    under connected and a low score."""
    banned = {**LIBP2P_PEER, "connected": False, "score": -104.0, "banned_for_s": 3550.0}
    lines = render_peers([MURMUR_PEER, banned]).splitlines()
    assert lines[2].split()[1] == "banned:60min"
    assert lines[1].split()[1] == "yes"
    assert lines[-1] == "2 known, 1 connected, 1 neighbours, 1 banned"
