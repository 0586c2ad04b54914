"""The privacy layer of a node on the network: seeds, round commits, the wait
for them, metrics and what the node tells its user.

Threat model (DECOR's SecLDP, Allouah et al., ICML 2024): honest-but-curious
peers that may collude (Sybils included) and know only the seeds of their own
edges. A node calibrates
against ``privacy.colluders`` of them (:mod:`~murmur.learning.privacy.collusion`:
the worst coalition of that many nodes pooling their edges' seeds); with 0,
the default, the ε it reports holds against whoever knows no edge seed, and
is weaker against neighbours that subtract their own edge's term (README,
known limits, has the figures). What a node sends is

    Δ̃_i = clip(Δ_i, C) + Σ_{j ∈ active(t)} v_ij^t + v̄_i,   v̄_i ~ N(0, σ_local² I)

The maths lives in learning/: :func:`~murmur.learning.privacy.calibration.calibrate`
turns the ``[privacy]`` budget and an assumed topology into a plan, and
:class:`~murmur.learning.privacy.stage.PrivacyStage` (sans-IO) perturbs each
round's delta and steps the accountant. :class:`NodePrivacy` puts a stage on
the network: signed ``KeyShare`` per learning edge (fresh X25519 key per node
start), signed ``RoundCommit`` per round, and the bounded wait for the
neighbours' commits.

Topology assumption: a node sees only its neighbourhood, but SecLDP's
constraint max_i [Σ⁻¹]_ii depends on the whole graph. A node therefore
calibrates on an *assumed* graph: a connected random ``d``-regular-ish graph on
``learning.num_nodes`` nodes, ``d = privacy.assumed_degree`` (0: the
configured ``network.neighbours``). The correlated (smaller) local std σ_cdp is
used only in rounds where the node has at least ``d`` active edges; in any
other round it falls back to σ_ldp, which satisfies the per-round constraint
by itself (Σ ⪰ σ_ldp² I), so a node's own missing edges never cost privacy.
Edges missing *elsewhere* in the network are not visible to a node and are not
accounted: that is the documented assumption.

Commit consistency: an edge is active at i iff i's commit lists j and j's
commit, received within the wait, lists i. A commit that arrives after the
partner's wait expired makes the edge active at one end only; the partner
counts such late commits (``late_commits``) — that noise does not cancel, it
is extra noise (privacy unharmed, utility hit), like a neighbour that dies
after committing, which :meth:`PrivacyStage.after_round` measures.

Decision (accepted, not fixed): no finite exchange of messages over a lossy,
asynchronous link makes both ends agree on "active" (two generals); a
"confirm" bit only moves the one-sided case from the commit to the confirm.
Agreement could only be restored *after* sending (carry the active set with
the delta and have the receiver subtract the partner's term), but the
receiver cannot remove noise from a model it has already mixed, and the
sender's term cannot be withdrawn. So the protocol keeps the safe direction:
an asymmetric edge only ever adds noise, the wait is bounded (min(1 s,
deadline/3)), and the cost is observable (``late_commits``; un-cancelled
variance d·s_ij² per such edge).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import Counter, Gauge

from murmur.errors import ReplayError, SendTimeout, StateDamaged
from murmur.learning.privacy.accountant import Spent
from murmur.learning.privacy.calibration import PrivacyLevel, PrivacyPlan, assumed_graph, calibrate, epsilon_against
from murmur.learning.privacy.dpsgd import dp_sgd_step
from murmur.learning.privacy.noise import (
    RoundCommit as CommitData,
    active_peers,
    make_round_commit,
    verify_round_commit,
)
from murmur.learning.privacy.outlook import NoiseOutlook, outlook
from murmur.learning.privacy.seeds import EdgeSecret, PairwiseSeeds, SignedKeyShare
from murmur.learning.privacy.stage import KEPT_ROUNDS, PrivacyStage
from murmur.learning.rounds import MAX_FUTURE_ROUNDS
from murmur.node.config import PrivacySection
from murmur.ratelog import Streak
from murmur.node.state import LEDGER_ADVICE
from murmur.protocol.identity import PeerId
from murmur.protocol.messages import KeyShare, RoundCommit
from murmur.protocol.transport import ConnectionClosed

if TYPE_CHECKING:
    from murmur.node.daemon import Node
    from murmur.node.session import Handler, PeerSession

log = logging.getLogger(__name__)

COMMIT_WAIT_MAX_S = 1.0
COMMIT_WAIT_DEADLINE_FRACTION = 1.0 / 3.0
"""The commit exchange may take at most min(1 s, deadline/3) of a round: the
rest of the deadline is for the deltas themselves."""
EXPOSURE_COALITIONS = (1, 2, 3)
"""Coalition sizes a node reports its run's ε against (beyond its own
``privacy.colluders``): a neighbour knows its edge's seed, so one curious
neighbour, or a few (Sybils among them), see more than an outsider; the
user sees how much more before choosing ``colluders``."""
SHARE_GRACE_ROUNDS = 1
"""A neighbour that has not answered our KeyShare this many rounds after it
went out is not waited for: a node with privacy answers the moment it gets
one, so it is not running the protocol (privacy off, or a Sybil), and
waiting for it would cost every round half the commit budget."""
FALLBACK_STREAK = 3
FALLBACK_WARN_EVERY = 100
"""A node whose rounds keep falling back to LDP noise says so after
FALLBACK_STREAK such rounds in a row and then once per this many more: a
node in a network smaller or sparser than its plan assumes falls back every
round, and what to change is the same each time. A lone fallback (a
neighbour's commit came late at start-up, churn) is only counted."""
_NAMESPACE = "murmur"


# --------------------------------------------------------------------------- on the network


def _merged(ledger: Sequence[Spent]) -> list[Spent]:
    """Consecutive entries of one calibration as one (restarts under an
    unchanged config keep the ledger one line long)."""
    out: list[Spent] = []
    for entry in ledger:
        if out and (out[-1].rdp_coef, out[-1].sampling_rate) == (entry.rdp_coef, entry.sampling_rate):
            out[-1] = Spent(entry.rdp_coef, entry.sampling_rate, out[-1].steps + entry.steps)
        elif entry.steps:
            out.append(entry)
    return out


class SeedView(Mapping[PeerId, EdgeSecret]):
    """Read-only mapping view of a :class:`PairwiseSeeds` (what PrivacyNoise reads):
    a secret derived after the stage was built is visible at once."""

    def __init__(self, seeds: PairwiseSeeds) -> None:
        self._seeds = seeds

    def __getitem__(self, peer: PeerId) -> EdgeSecret:
        return self._seeds.secret(peer)

    def __contains__(self, peer: object) -> bool:
        return isinstance(peer, PeerId) and self._seeds.has(peer)

    def __iter__(self) -> Iterator[PeerId]:
        return iter(self._seeds.peers())

    def __len__(self) -> int:
        return len(self._seeds.peers())


@dataclass
class _Commits:
    """Verified commits by round (bounded: KEPT_ROUNDS + MAX_FUTURE_ROUNDS rounds)."""

    by_round: dict[int, dict[PeerId, CommitData]] = field(default_factory=dict)

    def add(self, peer: PeerId, commit: CommitData) -> bool:
        bucket = self.by_round.setdefault(commit.round, {})
        old = bucket.get(peer)
        if old is not None:
            if old != commit:
                raise ReplayError(f"two different round commits for round {commit.round}")
            return False
        bucket[peer] = commit
        return True

    def get(self, round_: int) -> dict[PeerId, CommitData]:
        return self.by_round.get(round_, {})

    def prune(self, below: int) -> None:
        for r in [r for r in self.by_round if r < below]:
            del self.by_round[r]


class _PrivacyMetrics:
    """Privacy series in the node's own registry (created here, exported by /metrics)."""

    def __init__(self, registry: Any) -> None:
        self.uncancelled = Counter(
            "privacy_uncancelled_edges", "Committed edges whose partner's delta never arrived",
            namespace=_NAMESPACE, registry=registry,
        )
        self.uncancelled_norm = Gauge(
            "privacy_last_uncancelled_norm", "Norm of the last round's un-cancelled pairwise noise",
            namespace=_NAMESPACE, registry=registry,
        )
        self.fallback = Counter(
            "privacy_fallback_rounds", "Rounds sent with LDP-strength local noise (too few active edges)",
            namespace=_NAMESPACE, registry=registry,
        )
        self.share_timeouts = Counter(
            "privacy_share_timeouts", "Rounds whose wait for neighbours' key shares ran out its budget",
            namespace=_NAMESPACE, registry=registry,
        )
        self.active_edges = Gauge(
            "privacy_active_edges", "Edges that add pairwise noise this round", namespace=_NAMESPACE, registry=registry,
        )


class NodePrivacy:
    """A node's privacy layer on the network; the learner's ``privacy`` and the
    engine's ``perturber``.

    ``commit_listeners`` are awaited after this node's commit for a round is
    sent and before it waits for its neighbours' (instrumentation: a test
    uses it to kill a node at exactly that point).
    """

    def __init__(self, node: Node, stage: PrivacyStage, seeds: PairwiseSeeds, commit_wait_s: float,
                 noise_outlook: NoiseOutlook | None = None, exposure: Mapping[int, float] | None = None) -> None:
        self.node = node
        self.stage = stage
        self.outlook = noise_outlook  # None where the model's size was not known (no trainer)
        # the run's ε against coalitions of k > privacy.colluders nodes pooling their seeds (k -> ε)
        self.exposure = dict(exposure or {})
        self._fallback_streak = Streak(FALLBACK_STREAK, FALLBACK_WARN_EVERY)  # rounds sent with the fallback's noise
        self.seeds = seeds
        self.commit_wait_s = commit_wait_s
        self._commits = _Commits()
        self._shared: dict[PeerId, PeerSession] = {}  # the session our KeyShare went out on
        self._shared_round: dict[PeerId, int] = {}  # the round it went out in
        self._leaving: dict[PeerId, int] = {}  # peers whose session closed -> our round then (see forget)
        self._changed = asyncio.Condition()
        self._my_commits: dict[int, CommitData] = {}
        self._current = 0
        self.late_commits = 0
        self.share_timeouts = 0  # rounds whose wait for neighbours' KeyShares ran out
        self.commit_listeners: list[Callable[[int], Awaitable[None]]] = []
        self._closed_round = -1  # last round whose commit wait is over
        self._metrics = _PrivacyMetrics(node.metrics.registry)

    @classmethod
    def for_node(cls, node: Node, trainer: Any) -> NodePrivacy:
        """Calibrate from the node's config (see the module docstring) and build."""
        cfg = node.config
        section: PrivacySection = cfg.privacy
        learning = cfg.learning
        degree = section.assumed_degree or cfg.network.neighbours
        graph = assumed_graph(learning.num_nodes, degree, learning.seed)
        step = dp_sgd_step(trainer, learning.local_steps) if section.level is PrivacyLevel.EXAMPLE else None
        if section.colluders:  # seconds to a minute on large graphs: say why the start waits
            log.info("calibrating the privacy noise against colluders",
                     extra={"event": "privacy_calibrating", "colluders": section.colluders,
                            "nodes": learning.num_nodes, "degree": degree})
        plan = calibrate(
            section.scheme, epsilon=section.epsilon, delta=section.delta, rounds=cfg.privacy_rounds,
            clip=section.clip, graph=graph, level=section.level,
            sampling_rate=step.sampling_rate if step else None, sensitivity=step.sensitivity if step else None,
            budget=section.effective_budget, min_edges=min(degree, learning.num_nodes - 1),
            objective=section.objective.resolve(section.level), colluders=section.colluders,
        )
        seeds = PairwiseSeeds(node.identity)
        stage = PrivacyStage(node.peer_id, plan, SeedView(seeds), device=getattr(trainer, "device", "cpu"))
        if stage.accountant is not None:  # what earlier runs of this node already spent
            try:
                stage.accountant.prior = tuple(Spent.from_json(e) for e in node.state.load_privacy_ledger())
            except (ValueError, TypeError) as exc:
                raise StateDamaged(f"privacy ledger {node.state.privacy_path} is damaged ({exc}); "
                                   f"{LEDGER_ADVICE}") from None
        wait = min(COMMIT_WAIT_MAX_S, learning.round_deadline_s * COMMIT_WAIT_DEADLINE_FRACTION)
        noise = plan.noise
        exposure = {k: eps for k in EXPOSURE_COALITIONS if k > section.colluders
                    and (eps := epsilon_against(plan, graph, k, cfg.privacy_rounds)) is not None}
        log.info(
            "privacy calibrated",
            extra={"event": "privacy_plan", "scheme": plan.scheme.value, "level": plan.level.value,
                   "sigma_cdp": noise.sigma_cdp if noise else 0.0, "sigma_ldp": plan.sigma_ldp,
                   "rdp_coef": plan.rdp_coef, "objective": section.objective.resolve(section.level).value,
                   "min_edges": plan.min_edges, "residual_ratio": plan.residual_ratio,
                   "rounds": cfg.privacy_rounds, "colluders": section.colluders,
                   # the run's ε against k colluders (k -> ε), where the budget holds against `colluders`
                   "epsilon_against": {str(k): round(v, 3) for k, v in exposure.items()}},
        )
        seen = None
        if trainer is not None and noise is not None:
            bound = plan.clip if step is None else min(plan.clip, step.sensitivity * step.batch_size)
            seen = outlook(noise.sigma_cdp, plan.sigma_ldp, int(trainer.num_params()), bound,
                           learning.num_nodes, learning.rounds or cfg.privacy_rounds)
            _tell_outlook(seen, plan, cfg.privacy_rounds)
        return cls(node, stage, seeds, wait, seen, exposure)

    # -- learner hooks

    def handlers(self) -> Mapping[type, Handler]:
        return {KeyShare: self._on_keyshare, RoundCommit: self._on_commit}

    def clip(self, delta: torch.Tensor) -> torch.Tensor:
        return self.stage.clip(delta)

    def perturb(self, delta: torch.Tensor, round: int, committed: Sequence[str]) -> torch.Tensor:
        before = self.stage.counters.fallback_rounds
        sent = self.stage.perturb(delta, round, committed)
        accountant = self.stage.accountant
        if accountant is not None:  # on disk before the message leaves
            self.node.state.save_privacy_ledger([e.to_json() for e in _merged(accountant.ledger())])
        self._metrics.active_edges.set(len(committed))
        fallbacks = self.stage.counters.fallback_rounds
        if fallbacks > before:
            self._metrics.fallback.inc()
            if self._fallback_streak.hit():
                self._warn_fallback(round, len(committed), fallbacks)
        else:
            self._fallback_streak.reset()
        return sent

    def _warn_fallback(self, round_: int, active: int, fallbacks: int) -> None:
        plan = self.stage.plan
        seen = self.outlook
        log.warning(
            f"round {round_} had {active} active noise edges, the privacy plan needs {plan.min_edges}: like the "
            f"{self._fallback_streak.count - 1} rounds before it, it used "
            f"noise private on its own ({plan.sigma_ldp:.3g} per coordinate instead of "
            f"{plan.noise.sigma_cdp if plan.noise else 0.0:.3g})"
            + (f", a noise-to-signal of {seen.fallback_rho:.2g} over the run instead of {seen.rho:.2g}" if seen else "")
            + ". A network smaller or sparser than the plan assumes does this every round: set learning.num_nodes"
            " and privacy.assumed_degree to its size and degree (fallback_rounds in `murmur status` counts them)",
            extra={"event": "privacy_fallback", "round": round_, "active_edges": active, "min_edges": plan.min_edges,
                   "fallback_rounds": fallbacks},
        )

    async def commit(self, round_: int, neighbours: Mapping[str, int],
                     out_of_step: Collection[PeerId] = ()) -> list[str]:
        """Agree with the neighbours which edges add their pairwise term in ``round_``.

        1. send our KeyShare on every neighbour session that has not had it;
        2. wait (within the commit budget) for the neighbours' secrets;
        3. sign and send RoundCommit(round, peers we hold a secret for);
        4. wait (rest of the budget) for the commits of those peers, but not
           of those ``out_of_step`` (already past ``round_``: their commit is
           here or never comes);
        5. return the peers whose commit lists us (``edge_active``).

        Why step 4 skips them: a neighbour ahead of us committed this round
        long ago, and only to the neighbours it had then. In the default
        testnet a group of four nodes that started 2 s late had two of their
        three neighbours in a group 15 rounds ahead, waited out the budget
        (0.83 s) for their commits in every round, ran at 0.9 s a round
        against the others' 0.1 s, and never came level (accuracy 0.35; runs
        without the split 0.55-0.74).
        """
        self._current = round_
        if not self.stage.plan.uses_edges:
            return []
        end = time.monotonic() + self.commit_wait_s
        peers = [PeerId.from_string(p) for p in neighbours]
        # Each send by the step's own bound: sent without one, a neighbour that
        # never answered the stream's negotiation held the commit for the
        # transport's negotiate_timeout_s (10.0 s against a budget of 1 s).
        await asyncio.gather(*(self._share_with(p, end - self.commit_wait_s / 2) for p in peers))
        awaited = [p for p in peers if self._shared_round.get(p, round_) >= round_ - SHARE_GRACE_ROUNDS]
        if not await self._wait(lambda: all(self.seeds.has(p) for p in awaited), end - self.commit_wait_s / 2):
            self.share_timeouts += 1
            self._metrics.share_timeouts.inc()
        mine = [p for p in peers if self.seeds.has(p)]
        my_commit = make_round_commit(self.node.identity, round_, mine)
        self._my_commits[round_] = my_commit
        wire = RoundCommit(round=round_, peers=tuple(PeerId.from_bytes(p) for p in my_commit.peers),
                           signature=my_commit.signature)
        await asyncio.gather(*(self._send(p, wire, end) for p in peers))
        for listener in list(self.commit_listeners):
            await listener(round_)
        expected = [p for p in mine if p not in out_of_step]
        await self._wait(lambda: all(p in self._commits.get(round_) for p in expected), end)
        self._closed_round = max(self._closed_round, round_)
        got = {p: c for p, c in self._commits.get(round_).items() if p in set(mine)}
        active = active_peers(self.node.peer_id, my_commit, got)
        log.debug(
            "round commit",
            extra={"event": "commit", "round": round_, "neighbours": len(peers), "committed": len(mine),
                   "commits_received": len(got), "active": len(active)},
        )
        return [str(p) for p in sorted(active)]

    def after_round(self, round_: int, committed: Sequence[str], missing: Sequence[str]) -> None:
        report = self.stage.after_round(round_, committed, missing)
        if report is not None:
            self._metrics.uncancelled.inc(len(report.missing))
            self._metrics.uncancelled_norm.set(report.norm)
            # Within the peer-caused log budget, keyed by who did not deliver:
            # with quorum < 1 a round may close before a slow neighbour's
            # delta every round (the default testnet at quorum 0.75 wrote
            # 65-91 of these a run; at 1.0, 4-12).
            self.node.peer_log.warning(
                log, tuple(report.missing), "un-cancelled pairwise noise: committed peers did not deliver",
                extra={"event": "uncancelled_noise", "round": round_, "peers": [str(p) for p in report.missing],
                       "norm": round(report.norm, 4), "expected_norm": round(math.sqrt(report.variance), 4)},
            )
        self._commits.prune(round_ + 1 - KEPT_ROUNDS)
        self._forget_secrets(round_)
        for r in [r for r in self._my_commits if r < round_ + 1 - KEPT_ROUNDS]:
            del self._my_commits[r]
        self._current = round_ + 1

    def epsilon_spent(self) -> float:
        return self.stage.epsilon_spent()

    def budget_exhausted(self) -> bool:
        return self.stage.budget_exhausted()

    def edgeless(self, peers: Iterable[PeerId]) -> list[PeerId]:
        """Those of ``peers`` our KeyShare reached more than SHARE_GRACE_ROUNDS
        rounds ago that never sent theirs: they run no privacy protocol
        (privacy off, or an attacker's identity), so no pairwise noise goes
        on their edge, however long we keep them."""
        if not self.stage.plan.uses_edges:
            return []
        return [p for p in peers if not self.seeds.has(p)
                and self._shared_round.get(p, self._current) < self._current - SHARE_GRACE_ROUNDS]

    def status(self) -> dict[str, Any]:
        c = self.stage.counters
        plan = self.stage.plan
        return {
            "scheme": plan.scheme.value,
            "level": plan.level.value,
            "sigma_cdp": plan.noise.sigma_cdp if plan.noise else 0.0,
            "sigma_ldp": plan.sigma_ldp,
            "colluders": self.node.config.privacy.colluders,  # whom the reported ε holds against (0: outsiders)
            # the whole run's ε against k nodes pooling their seeds (the budget holds against `colluders`)
            "epsilon_against": {str(k): v for k, v in self.exposure.items()},
            "rounds_sent": c.rounds_sent,
            "fallback_rounds": c.fallback_rounds,
            "uncancelled_rounds": c.uncancelled_rounds,
            "uncancelled_edges": c.uncancelled_edges,
            "last_uncancelled_norm": c.last_uncancelled_norm,
            "late_commits": self.late_commits,
            "share_timeouts": self.share_timeouts,
            "edges_with_secret": len(self.seeds.peers()),
            "neighbours_without_edge": len(self.edgeless(s.peer for s in self.node.membership.learning_neighbours())),
            **({} if self.outlook is None else {
                "noise_to_signal": self.outlook.rho, "noise_to_signal_fallback": self.outlook.fallback_rho}),
        }

    # -- network

    def forget(self, peer: PeerId) -> None:
        """``peer`` has no session left: drop what we sent it now, and its
        secret once the rounds we keep are past (a round it committed to and
        never delivered still needs the secret: :meth:`after_round` measures
        the noise left behind). A returning peer exchanges shares again on its
        new session (both ends forget at the close). Kept, secrets grew with
        every peer ever met, and the session each share went out on was held
        after it closed."""
        self._shared.pop(peer, None)
        self._shared_round.pop(peer, None)
        self._leaving[peer] = self._current

    def _forget_secrets(self, round_: int) -> None:
        for peer, since in list(self._leaving.items()):
            if self.node.session(peer) is not None:
                del self._leaving[peer]  # back: its new share replaces the secret
            elif since <= round_ + 1 - KEPT_ROUNDS:
                del self._leaving[peer]
                self.seeds.forget(peer)

    async def on_linked(self, peer: PeerId) -> None:
        """A new learning edge gets our KeyShare at once, not at our next
        commit: its answer is then usually in before that commit waits for
        it. Sent at commit time only, every node of the default testnet
        waited out half its commit budget at round 0 and then sent with
        the fallback's noise."""
        if self.stage.plan.uses_edges:
            await self._share_with(peer)

    async def _share_with(self, peer: PeerId, deadline: float | None = None) -> None:
        session = self.node.session(peer)
        if session is None or self._shared.get(peer) is session:
            return
        share = self.seeds.share_for(peer)
        self._shared[peer] = session
        self._shared_round[peer] = self._current
        if not await self._send(peer, KeyShare(x25519_pub=share.x25519_pub, signature=share.signature), deadline):
            self._shared.pop(peer, None)
            self._shared_round.pop(peer, None)

    async def _send(self, peer: PeerId, msg: KeyShare | RoundCommit, deadline: float | None = None) -> bool:
        """Whether ``msg`` went to ``peer`` (by ``deadline``, if given: a peer
        without room by then misses it, and the transport cuts one that stays so)."""
        session = self.node.session(peer)
        if session is None:
            return False
        try:
            await session.send(msg, deadline)
        except (ConnectionClosed, SendTimeout):
            return False
        return True

    async def _wait(self, predicate: Callable[[], bool], until: float) -> bool:
        async with self._changed:
            left = until - time.monotonic()
            if predicate():
                return True
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), left)
            except TimeoutError:
                return False
            return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _on_keyshare(self, session: PeerSession, msg: KeyShare) -> None:
        """Verify the signed share (SignatureError / DecodeError otherwise),
        derive the edge secret, and answer with ours on this session once."""
        self.seeds.accept_share(session.peer, SignedKeyShare(msg.x25519_pub, msg.signature))
        await self._share_with(session.peer)
        await self._notify()

    async def _on_commit(self, session: PeerSession, msg: RoundCommit) -> None:
        if msg.round < self._current - KEPT_ROUNDS + 1 or msg.round > self._current + MAX_FUTURE_ROUNDS:
            return  # outside the window we keep: harmless, ignored
        data = CommitData(msg.round, tuple(p.raw for p in msg.peers), msg.signature)
        verify_round_commit(data, session.peer)  # SignatureError / DecodeError
        mine = self._my_commits.get(msg.round)
        if self._commits.add(session.peer, data) and mine is not None and msg.round <= self._closed_round:
            # The partner committed after our wait for this round was over.
            if session.peer.raw in mine.peers and self.node.peer_id.raw in data.peers:
                self.late_commits += 1
        await self._notify()


def _tell_outlook(seen: NoiseOutlook, plan: PrivacyPlan, rounds: int) -> None:
    """Log the plan's noise-to-signal (:mod:`murmur.learning.privacy.outlook`);
    a WARNING, with what to change, where the noise outweighs what the run could learn."""
    extra = {"event": "privacy_outlook", "noise_to_signal": seen.rho, "noise_to_signal_fallback": seen.fallback_rho,
             "noise_per_round": seen.per_round}
    if not seen.outweighs:
        log.info(f"privacy noise-to-signal over the run {seen.rho:.2g} (learning needs well under 1)", extra=extra)
        return
    advice = (
        'level = "user" protects each node\'s whole data set and needs many nodes: level = "example" (DP-SGD, '
        "see the config's comments) protects each example at a small part of the noise"
        if plan.level is PrivacyLevel.USER else
        "a larger privacy.epsilon or more nodes lower it, and so does privacy.rounds no larger than the rounds "
        "the node trains"
    )
    log.warning(
        f"privacy noise outweighs the learning: over the run it is {seen.rho:.2g} times the most all updates could "
        f"move the mean model (one round's noise is {seen.per_round:.3g} times an update; noise calibrated for "
        f"{rounds} rounds). Expect little of the model. {advice}",
        extra=extra,
    )
