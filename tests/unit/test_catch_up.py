"""catch_up_target: whom a node behind its neighbours may adopt a model from."""

from __future__ import annotations

from murmur.node.catchup import (
    CATCH_UP_GAP,
    MAX_TRUSTED_PEERS,
    NeighbourRounds,
    ahead_of_network,
    catch_up_sources,
    catch_up_target,
    claims_ahead,
    lagging_neighbour,
    out_of_step,
    voters,
)
from murmur.protocol.identity import Identity
from tests.clocks import ManualClock

A, B, C, SYBIL = (Identity.generate().peer_id for _ in range(4))
FAR = 10_000


def test_a_lone_unvouched_claim_ahead_is_not_followed() -> None:
    """One Sybil (or an attacker racing ahead while honest nodes start) claiming
    a far round among neighbours at our round moves nothing, trusted or not yet."""
    assert catch_up_target({A: 5, B: 5, C: 6, SYBIL: FAR}, 5, {}) is None
    assert catch_up_target({A: 5, B: 5, C: 6, SYBIL: FAR}, 5, {A: 0.3, B: 0.3, C: 0.3, SYBIL: 0.0}) is None


def test_a_lone_claim_vouched_by_past_rounds_is_followed() -> None:
    """A healed partition: the one neighbour from the other side is ahead, and
    it had weight in our aggregations before the split."""
    assert catch_up_target({A: 5, B: 5, C: 30}, 5, {A: 0.3, B: 0.3, C: 0.2}) is C


def test_majority_ahead_is_followed_from_the_most_trusted_least_extreme() -> None:
    claimed = {A: 20, B: 21, C: 4, SYBIL: FAR}
    assert catch_up_target(claimed, 4, {A: 0.2, B: 0.3, C: 0.3, SYBIL: 0.0}) is B
    assert catch_up_target(claimed, 4, {}) is A  # a restarted node knows no weights: least extreme claim
    assert catch_up_target(claimed, 4, {SYBIL: 0.0}) is A  # never the one given no weight


def test_majority_of_zero_weights_still_moves_a_node_left_behind() -> None:
    """Krum gives most honest neighbours 0 in a round: a node whose neighbours
    all moved on must still catch up."""
    assert catch_up_target({A: 20, B: 20}, 4, {A: 0.0, B: 0.0}) in {A, B}


def test_gap_and_empty() -> None:
    assert catch_up_target({}, 0, {}) is None
    assert catch_up_target({A: CATCH_UP_GAP, B: CATCH_UP_GAP}, 0, {}) is None
    assert catch_up_target({A: CATCH_UP_GAP + 1}, 0, {}) is A  # the only neighbour, and ahead


def test_two_sybils_ahead_of_a_starting_node_with_one_honest_neighbour_move_nothing() -> None:
    """Two Sybils that linked to a node at round 0 before its other honest
    neighbours did are two of its three neighbours: a bare majority, and no
    trust yet to tell them apart. They must not hand it their model (CI saw a
    node adopt round 1001 this way); all neighbours ahead still moves it."""
    sybil2 = Identity.generate().peer_id
    assert catch_up_target({A: 0, SYBIL: FAR, sybil2: FAR}, 0, {}) is None
    assert catch_up_target({A: 0, B: 0, SYBIL: FAR, sybil2: FAR}, 0, {}) is None
    assert catch_up_target({A: 30, B: 30, C: 30}, 0, {}) in {A, B, C}


def test_the_neighbours_we_chose_decide_when_any_is_a_neighbour() -> None:
    """A late starter chose A, B and C, all far ahead, and two other late
    starters (D, E) linked to it, level: 3 of 5 is not more than two thirds,
    but 3 of the 3 it chose is, and it adopts from one of them. The other
    way, two Sybils that linked to it unasked, ahead, move nothing where its
    choices are level, and are never the one adopted from."""
    d, e, sybil2 = (Identity.generate().peer_id for _ in range(3))
    late = {A: 30, B: 31, C: 30, d: 0, e: 0}
    assert catch_up_target(late, 0, {}) is None  # every neighbour votes: held back
    assert catch_up_target(late, 0, {}, choices={A, B, C}) in {A, C}
    assert voters(late, {A, B, C}) == {A: 30, B: 31, C: 30}
    pushed = {A: 0, B: 0, SYBIL: FAR, sybil2: FAR}
    assert catch_up_target(pushed, 0, {}, choices={A, B}) is None
    assert catch_up_target({A: 30, B: 30, SYBIL: 29}, 0, {}, choices={A, B}) in {A, B}  # not the lesser claim
    # no choice of ours is a neighbour (all linked to us), or only one is: every neighbour votes, as before
    assert voters(late, {Identity.generate().peer_id}) == late
    assert voters(late, {A}) == late
    assert catch_up_target({A: 30, d: 0, e: 0}, 0, {}, choices={A}) is None  # a lone early choice ahead
    assert catch_up_target({A: 30, B: 30, C: 30}, 0, {}, choices=set()) in {A, B, C}


def test_one_neighbour_ahead_moves_a_starting_node_only_where_it_looks_for_one() -> None:
    """A node started seconds late on a loaded machine linked first to a
    Sybil racing ahead, before its honest neighbours (the default testnet:
    it adopted the Sybil's model at round 20 and ended at accuracy 0.08,
    attack rate 0.69). One vote is all of it only in a network of two."""
    assert catch_up_target({SYBIL: FAR}, 0, {}, min_voters=2) is None
    assert catch_up_target({SYBIL: FAR, A: 0}, 0, {}, min_voters=2) is None  # then its honest neighbour links
    assert catch_up_target({A: 30, B: 30}, 0, {}, min_voters=2) in {A, B}  # a late joiner, everyone ahead
    assert catch_up_target({A: 30}, 0, {}, min_voters=1) is A  # a network of two
    assert catch_up_target({A: 30}, 0, {A: 0.4}, min_voters=2) is A  # a claim vouched for by trust needs no vote
    sybil2 = Identity.generate().peer_id
    # two Sybils that dialled it (not its choices) are two voters, but not ours
    assert catch_up_target({SYBIL: FAR, sybil2: FAR}, 0, {}, choices={A, B}, min_voters=2) is None
    assert catch_up_target({SYBIL: FAR, sybil2: FAR, A: 30, B: 30}, 0, {}, choices={A, B}, min_voters=2) in {A, B}


def test_several_sources_are_ranked_most_trusted_then_least_extreme() -> None:
    """Catch-up asks several neighbours ahead for their models (and adopts their
    median): the same peers the single choice would consider, best first."""
    claimed = {A: 20, B: 21, C: 22, SYBIL: FAR}
    trust = {A: 0.2, B: 0.3, C: 0.2, SYBIL: 0.9}
    assert catch_up_sources(claimed, 4, trust) == [SYBIL, B, A, C]
    assert catch_up_sources(claimed, 4, trust, limit=2) == [SYBIL, B]
    assert catch_up_sources(claimed, 4, {SYBIL: 0.0}) == [A, B, C]  # never one given no weight
    assert catch_up_sources({A: 5, B: 5, C: 30}, 5, {A: 0.3, B: 0.3, C: 0.2}) == [C]  # a lone vouched claim
    assert catch_up_sources({A: 5, B: 5, SYBIL: FAR}, 5, {}) == []


def test_a_node_waits_for_most_of_its_neighbours_when_they_are_behind_and_sending() -> None:
    """Ours is round 20. Two of three neighbours more than CATCH_UP_GAP behind
    and still sending: most are behind, the round waits its deadline. One of
    three, or within the gap, or exactly half: it closes on its quorum."""
    behind = 20 - CATCH_UP_GAP - 1
    everyone = {A, B, C}
    assert ahead_of_network({A: behind, B: behind, C: 20}, 20, everyone)
    assert ahead_of_network({A: 0, B: 1, C: 2}, 20, everyone)
    assert not ahead_of_network({A: behind, B: 20, C: 20}, 20, everyone)
    assert not ahead_of_network({A: 20 - CATCH_UP_GAP, B: 20 - CATCH_UP_GAP, C: 20}, 20, everyone)
    assert not ahead_of_network({A: behind, B: 20}, 20, everyone)  # half is not most
    assert not ahead_of_network({}, 20, everyone)


def test_neighbours_behind_that_stopped_sending_leave_the_vote() -> None:
    """A crashed peer whose connection lingers claims its last round for
    good: it neither holds us (behind, silent) nor counts against the rest.
    Two of three silent behind, the third level: we run on. Two sending
    behind and one silent behind: two of the two that count are behind."""
    assert not ahead_of_network({A: 3, B: 3, C: 20}, 20, {C})
    assert ahead_of_network({A: 3, B: 3, C: 3}, 20, {A, B})
    assert not ahead_of_network({A: 3, B: 3, C: 20}, 20, {A})  # one of the two that count


def test_neighbours_that_linked_unasked_cannot_hold_a_node_by_themselves() -> None:
    """Sybils that linked to us (not chosen) and keep sending rounds far
    behind: once two we chose are linked, only those vote, and they are
    level."""
    sybil2 = Identity.generate().peer_id
    claimed = {A: 20, B: 20, SYBIL: 0, sybil2: 0}
    live = {A, B, SYBIL, sybil2}
    assert not ahead_of_network(claimed, 20, live, choices={A, B})
    assert not ahead_of_network(claimed, 20, live, choices={A})  # one choice: everyone votes, 2 of 4 is not most
    sybil3 = Identity.generate().peer_id
    crowd = {**claimed, sybil3: 0}
    assert ahead_of_network(crowd, 20, live | {sybil3}, choices={A})  # 3 of 5: they slow us to the deadline's pace
    assert not ahead_of_network(crowd, 20, live | {sybil3}, choices={A, B})


def test_the_claims_that_hold_a_lone_answer_are_the_voters_ahead() -> None:
    """A Sybil that linked to us unasked claims 10^9; only the neighbours we
    chose vote once two of them are linked, and those not ahead of us do not count."""
    claimed = {A: 40, B: 41, C: 5 + CATCH_UP_GAP, SYBIL: FAR}
    assert sorted(claims_ahead(claimed, 5, choices={A, B, C})) == [40, 41]
    assert sorted(claims_ahead(claimed, 5)) == [40, 41, FAR]  # choices unknown: every neighbour votes
    assert claims_ahead(claimed, 50, choices={A, B, C}) == []


def test_commits_not_worth_waiting_for_are_those_past_the_round() -> None:
    """Round 10: a neighbour at 11 may still have its commit of 10 in flight,
    one at 12 made it long ago; one behind, however far, may reach round 10
    within the budget (testnet rounds are ~0.1 s)."""
    claimed = {A: 10, B: 11, C: 12, SYBIL: 10 - CATCH_UP_GAP - 1}
    assert out_of_step(claimed, 10) == {C}
    assert out_of_step({}, 10) == set()


def test_any_neighbour_behind_and_sending_halves_the_pace() -> None:
    """Any neighbour, chosen or not, more than CATCH_UP_GAP behind and heard
    from lately; one that stopped sending (crashed, finished) does not count."""
    claimed = {A: 20, B: 20, C: 20 - CATCH_UP_GAP - 1}
    assert lagging_neighbour(claimed, 20, live={A, B, C}) == [20 - CATCH_UP_GAP - 1]
    assert lagging_neighbour({**claimed, B: 3}, 20, live={A, B, C}) == [3, 20 - CATCH_UP_GAP - 1]  # ascending
    assert lagging_neighbour(claimed, 20, live={A, B}) == []  # C went quiet
    assert lagging_neighbour({A: 20, B: 20 - CATCH_UP_GAP}, 20, live={A, B}) == []  # within the gap
    assert lagging_neighbour({}, 20, live=set()) == []


def test_a_claim_is_the_later_of_the_hello_and_the_latest_message() -> None:
    """A message never lowers a claim (one for an old round arriving late),
    a hello names the round a neighbour was at when it linked, and a
    neighbour we heard nothing from claims what its hello said (-1: none)."""
    rounds = NeighbourRounds(ManualClock())
    rounds.heard(A, 7)
    rounds.heard(A, 5)
    rounds.heard(B, 3)
    assert rounds.claimed({A: 2, B: 9, C: -1}) == {A: 7, B: 9, C: -1}


def test_live_neighbours_are_those_heard_lately_and_neighbours_gone_are_forgotten() -> None:
    clock = ManualClock(100.0)
    rounds = NeighbourRounds(clock)
    rounds.heard(A, 1)
    clock.now = 105.0
    rounds.heard(B, 1)
    assert rounds.live(within_s=10.0) == {A, B}
    assert rounds.live(within_s=3.0) == {B}
    rounds.weighed({str(A): 0.5}, current={A})  # B's session ended
    assert rounds.live(within_s=10.0) == {A}
    assert rounds.claimed({A: -1, B: -1}) == {A: 1, B: -1}


def test_trust_is_each_neighbours_last_weight_and_outlives_its_session_within_a_bound() -> None:
    """The weight of the latest aggregation a neighbour took part in (one it
    missed keeps the old weight); a peer gone keeps its trust (the other
    side of a healed partition); the oldest weighed are dropped past
    MAX_TRUSTED_PEERS."""
    rounds = NeighbourRounds(ManualClock())
    rounds.weighed({str(A): 0.25, str(B): 0.0}, current={A, B})
    rounds.weighed({str(A): 0.5}, current={A, B})
    assert rounds.trust == {B: 0.0, A: 0.5}
    rounds.weighed({}, current=set())
    assert rounds.trust == {B: 0.0, A: 0.5}
    others = [Identity.generate().peer_id for _ in range(MAX_TRUSTED_PEERS - 1)]
    for peer in others:
        rounds.weighed({str(peer): 1.0}, current={peer})
    assert len(rounds.trust) == MAX_TRUSTED_PEERS and B not in rounds.trust and A in rounds.trust
