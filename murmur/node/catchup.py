"""What a node may do with its neighbours' claims of the round they are in.

A neighbour's round is only what it says (its hello, its round messages),
so every rule here decides from claims a Sybil can make too, and each one
bounds what a false claim buys: adopt a model (catch-up: more than two
thirds of the chosen neighbours ahead, or one we gave weight before), wait
out a round's deadline (most neighbours behind and still sending), run at
half pace (any neighbour behind), stop waiting for a privacy commit (a
neighbour already past the next round). Pure functions of the claims: the
learner (murmur/node/learner.py) gathers the claims and acts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from fractions import Fraction

from murmur.protocol.identity import PeerId

CATCH_UP_GAP = 2
"""Rounds a neighbour may be ahead before we fetch its model instead of
trying to keep up: beyond this its deltas are no longer buffered for us."""
MIN_CHOSEN_VOTERS = 2  # chosen neighbours that must be linked before they alone vote on catch-up (voters)
CATCH_UP_QUORUM = Fraction(2, 3)  # share of neighbours ahead that moves a node with no vouched claim (catch_up_target)
BEHIND_LIVE_DEADLINES = 2.0
"""A neighbour behind us counts towards pacing us (:func:`ahead_of_network`)
only while its round messages keep coming: one heard within this many round
deadlines. A crashed peer whose connection lingers, or one that linked and
went quiet, claims its last round for good, and must not hold us to the
deadline's pace until its session ends."""
CATCH_UP_SOURCES = 5
"""Neighbours ahead a catch-up asks for their model at once (the most trusted
first): their coordinate-wise median is adopted (murmur.learning.adoption),
which two poisoned models among five cannot move outside the honest ones'
range. A rare event: five model transfers, five models held until adopted."""


MAX_TRUSTED_PEERS = 4096  # past neighbours whose last aggregation weight we remember


class NeighbourRounds:
    """What the rules below read about the neighbours: the latest round each
    sent us a message for and when (its claim, and whether it still sends),
    and the weight our aggregation last gave each (``trust``: what vouches
    for a lone neighbour ahead, :func:`catch_up_sources`).

    Rounds are kept for current neighbours only; trust outlives a session
    (a healed partition's other side comes back with the weight it had),
    for the MAX_TRUSTED_PEERS peers weighed most recently."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._rounds: dict[PeerId, int] = {}  # the latest round each neighbour sent us
        self._heard: dict[PeerId, float] = {}  # when it last sent us a round message
        self.trust: dict[PeerId, float] = {}  # oldest-weighed first

    def heard(self, peer: PeerId, round_: int) -> None:
        """A round message of ``peer``'s for ``round_`` arrived."""
        self._rounds[peer] = max(self._rounds.get(peer, -1), round_)
        self._heard[peer] = self._clock()

    def weighed(self, weights: Mapping[str, float], current: Collection[PeerId]) -> None:
        """A round closed with ``weights`` (peer id text -> weight); ``current``
        are our neighbours now: the others' rounds are forgotten."""
        for peer in current:
            weight = weights.get(str(peer))
            if weight is not None:
                self.trust.pop(peer, None)  # re-inserted last: the dict is oldest-first
                self.trust[peer] = weight
        while len(self.trust) > MAX_TRUSTED_PEERS:
            del self.trust[next(iter(self.trust))]
        self._rounds = {peer: r for peer, r in self._rounds.items() if peer in current}
        self._heard = {peer: t for peer, t in self._heard.items() if peer in current}

    def claimed(self, hellos: Mapping[PeerId, int]) -> dict[PeerId, int]:
        """Each neighbour's claim (``hellos``: every neighbour, with the round
        its hello named, -1 for none): the later of that and its latest
        message. Every neighbour votes, muted ones too: silence must not hand
        the majority to Sybils that claim rounds far ahead."""
        return {peer: max(self._rounds.get(peer, -1), hello) for peer, hello in hellos.items()}

    def live(self, within_s: float) -> set[PeerId]:
        """Neighbours we heard a round message from within ``within_s``."""
        horizon = self._clock() - within_s
        return {peer for peer, heard in self._heard.items() if heard >= horizon}


def voters(claimed: Mapping[PeerId, int], choices: Collection[PeerId] = ()) -> dict[PeerId, int]:
    """The neighbours whose claims decide whether most of them are ahead:
    those we chose (``choices``, the peer sampler's) when at least
    MIN_CHOSEN_VOTERS of them are neighbours, else all of them (a lone
    choice linked early, ahead, must not outvote the level peers that
    linked to us meanwhile).

    Why the chosen ones. A peer links to us at will, so counting the
    neighbours that linked to us let them decide both ways. Eight daemons
    started together on 2 cores (start_wait_s 75, k = 3): the four that
    were up first began their rounds, and three of the late ones had chosen
    three of them, all ahead, but also had two late ones link to them, level:
    3 of 5 ahead is not more than two thirds, so none caught up, each ran two
    rounds alone at the 30 s deadline (their neighbours' messages too far
    ahead to buffer), and the three then learnt as a group of their own to
    the end (accuracy 0.69-0.76 against 0.80 in the first group, which
    finished a minute earlier). The other way, Sybils that link to a node
    count towards the two thirds that move it; only those it chose can now,
    and its choices are the peer sampler's, whose subnet-bucket limits are
    the defence against an eclipse."""
    chosen = {peer: r for peer, r in claimed.items() if peer in choices}
    return chosen if len(chosen) >= MIN_CHOSEN_VOTERS else dict(claimed)


def claims_ahead(claimed: Mapping[PeerId, int], own_round: int, choices: Collection[PeerId] = ()) -> list[int]:
    """The rounds the voting neighbours (:func:`voters`) more than
    CATCH_UP_GAP rounds ahead of ``own_round`` claim: what a lone catch-up
    answer's round is held to (:func:`murmur.learning.adoption.within_claims`).
    Voters only: peers that linked to us unasked must not set the bound."""
    return [r for r in voters(claimed, choices).values() if r > own_round + CATCH_UP_GAP]


def out_of_step(claimed: Mapping[PeerId, int], round_: int) -> set[PeerId]:
    """Neighbours whose privacy commit for ``round_`` is not worth waiting
    for: those that claim a later round than the next. A node commits a
    round before it sends it, so theirs is here already or never comes: they
    moved on, and committed only to the neighbours they had then. See
    :meth:`murmur.node.privacy.NodePrivacy.commit`.

    Not those behind, however far: at the rounds of a testnet (~0.1 s) one
    three rounds behind reaches our round within the budget and commits it,
    and an edge whose commit we stopped waiting for is active at its end
    only, its pairwise noise left uncancelled."""
    return {peer for peer, r in claimed.items() if r > round_ + 1}


def lagging_neighbour(claimed: Mapping[PeerId, int], own_round: int, live: Collection[PeerId]) -> list[int]:
    """The rounds (ascending) of the neighbours still sending (``live``) that
    are more than CATCH_UP_GAP rounds behind us; any at all: the round loop
    halves its pace (each round lasts twice as long as it took, within its
    deadline), so that the neighbour, at its full pace, comes level. The
    rounds are what the pacing line names, as the round decided on them.

    Why any, not most (:func:`ahead_of_network`, which waits out the
    deadline): two groups that started apart and met through a minority of
    links kept their distance for good. In the default testnet three nodes
    and the node in its own process started their rounds 1-2 s before the
    other four, ran 15 rounds ahead before those began, and the late four
    had two of their three neighbours ahead (catch-up needs more than two
    thirds), while each of the first had at most one of its voters behind.
    Both sides ran at one pace to the end; the cross edges carried nothing
    usable, and such runs ended at accuracy 0.35-0.40 against 0.55-0.74.
    Half the pace, not the deadline: any neighbour, one that linked to us
    unasked too (the first group's voters are its own), so a Sybil claiming
    to be behind can halve our pace, no more."""
    return sorted(r for peer, r in claimed.items() if r + CATCH_UP_GAP < own_round and peer in live)


def ahead_of_network(claimed: Mapping[PeerId, int], own_round: int, live: Collection[PeerId],
                     choices: Collection[PeerId] = ()) -> bool:
    """Whether most of the neighbours that vote (:func:`voters`) are more
    than CATCH_UP_GAP rounds behind us and still sending (``live``): then a
    round waits its whole deadline for them instead of closing on its quorum.

    Why. A round closes once a quorum of the neighbours it waits for
    delivered, and one behind us cannot deliver our round; after a few
    rounds without its message it is muted and no longer waited for. So a
    node ahead ran at the pace of whoever was level with it, and nothing
    brought the two sides together: neighbours behind catch up only when
    more than two thirds of theirs are ahead or one ahead earned their
    trust. In the default testnet the node in a process of its own was up
    first, had only a Sybil linked when its start wait ended, and raced it
    to round 10 (rounds of 70 ms, the Sybil answering at once) before its
    honest neighbours linked at round 0; it then kept that lead to the end,
    its rounds made of its own step and the Sybil's message (accuracy
    0.11-0.25 against 0.36-0.49), and two neighbours 7 rounds behind at the
    end adopted its model (3 of 4 runs had a node 8-11 rounds ahead of the
    median). Two pairs started apart kept their distance for good the same
    way. Waiting out the deadline gives the neighbours behind (which count
    our later rounds as delivered, see RoundEngine.quorum_reached) the time
    to come level.

    Only neighbours still sending count as behind, and the rest of the
    vote stays in the count: a crashed peer whose connection lingers is
    left out. The chosen neighbours decide when enough of them are linked,
    as for catch-up: peers that linked to us unasked (a Sybil claiming low
    rounds) cannot hold us by themselves, and those we chose can at most
    slow us to the deadline's pace."""
    voting = voters(claimed, choices)
    behind = [peer for peer, r in voting.items() if r + CATCH_UP_GAP < own_round]
    gone = sum(1 for peer in behind if peer not in live)
    return 2 * (len(behind) - gone) > len(voting) - gone


def catch_up_target(claimed: Mapping[PeerId, int], own_round: int, trust: Mapping[PeerId, float],
                    choices: Collection[PeerId] = (), min_voters: int = 1) -> PeerId | None:
    """The first neighbour :func:`catch_up_sources` would ask for its model,
    or None when catch-up may not move us (the round loop's test)."""
    peers = catch_up_sources(claimed, own_round, trust, choices, min_voters, limit=1)
    return peers[0] if peers else None


def catch_up_sources(claimed: Mapping[PeerId, int], own_round: int, trust: Mapping[PeerId, float],
                     choices: Collection[PeerId] = (), min_voters: int = 1,
                     limit: int = CATCH_UP_SOURCES) -> list[PeerId]:
    """Whom to ask for a model to adopt (at most ``limit``, best first), or none.

    A neighbour's round is only its claim and the model it would hand us is
    whatever it says, so following the highest claim let one Sybil (or an
    attacker racing ahead while honest nodes start up) replace an honest
    model outright. Only neighbours more than ``CATCH_UP_GAP`` rounds ahead
    count, and then:

    * when more than two thirds of our neighbours are ahead (of those we
      chose, ``choices``, once MIN_CHOSEN_VOTERS of them are neighbours:
      :func:`voters`), any of them but
      those our aggregator gave no weight the last time they took part
      (SybilWall gives Sybils 0), unless that leaves none: a late joiner or a
      restarted node, whose neighbours all moved on. Two thirds, not half: two
      Sybils that linked to a starting node before its k honest neighbours
      did held the majority against the one honest neighbour it had, and
      handed it their model (CI saw it); a node that really is behind has
      (nearly) all its neighbours ahead;
    * otherwise only those it gave positive weight: a lone claim ahead must
      be vouched for by past rounds (the two sides of a healed partition
      learnt from each other before it), or anyone could claim it.

    The two thirds count only once ``min_voters`` neighbours we chose vote
    (any neighbours, where ``choices`` is not known): a node
    that starts a few seconds after the others (a loaded machine) links
    first to whoever dials it soonest, and an attacker up before everyone,
    racing its rounds ahead, is soonest. One Sybil alone then held "all" of
    the vote: in the default testnet a late honest node adopted its model
    at round 20 before its three honest neighbours linked, ran ahead of them
    with the Sybil its only neighbour, and ended at accuracy 0.08, attack
    rate 0.69 (the others 0.51, 0.0). Two Sybils that both dialled a
    starting node were two voters, and did the same (round 6 of the default
    scenario's test run).

    Among those, the most trusted, then the least extreme claim, first. The
    caller asks up to ``limit`` of them and adopts the coordinate-wise median
    of the models that arrive (murmur.learning.adoption), since the most
    trusted alone may be a Sybil: under privacy SybilWall gives diversified
    Sybils weight, and in a loaded default testnet nodes 6-8 rounds behind
    that adopted the most trusted neighbour's model outright followed a
    Sybil from accuracy 0.21-0.40 to 0.08-0.11. With one or two models the
    most trusted is still adopted outright: a node with one or two
    neighbours ahead has nothing a Sybil cannot match.
    """
    ahead = {peer: r for peer, r in claimed.items() if r > own_round + CATCH_UP_GAP}
    eligible = [peer for peer in ahead if trust.get(peer, 0.0) > 0.0]
    voting = voters(claimed, choices)
    ahead_voting = [peer for peer in voting if peer in ahead]
    # Of them, ours: peers that linked to us unasked (Sybils dialling a node
    # as it starts) never make the vote by themselves.
    chosen_voting = [peer for peer in voting if peer in choices] if choices else list(voting)
    if len(chosen_voting) >= min_voters and \
            CATCH_UP_QUORUM.denominator * len(ahead_voting) > CATCH_UP_QUORUM.numerator * len(voting):
        # Krum, say, gives most honest peers 0 in any one round: when every
        # neighbour ahead has 0, a node left behind must still move.
        # Only the voters: a peer that linked to us unasked must not be the one we adopt from.
        eligible += [peer for peer in ahead_voting if peer not in trust]
        eligible = eligible or ahead_voting
    return sorted(eligible, key=lambda peer: (-trust.get(peer, 0.0), ahead[peer]))[:limit]

