"""The persistent-pull bound (murmur.learning.aggregators.persistence), each
with a known answer, and SybilWall's use of it against a lone Sybil with a
fixed offset under DP-like noise."""

from __future__ import annotations

import io

import pytest
import torch

from murmur.errors import ConfigError
from murmur.learning.aggregators import get_aggregator
from murmur.learning.aggregators.persistence import FORGET_ROUNDS, WARMUP_ROUNDS, PersistentPull
from murmur.learning.aggregators.sybilwall import SybilWallAggregator

from .conftest import orthogonalish, updates

DIM = 1024
ME = "me"


def test_the_mean_cancels_fresh_noise_and_keeps_a_fixed_offset() -> None:
    """Noise that averages out in time leaves no pull; a fixed offset stays whole."""
    noise, offset = orthogonalish(2, DIM, 1)
    pull = PersistentPull()
    for r in range(10):
        sign = 1.0 if r % 2 == 0 else -1.0
        pull.observe(torch.zeros(DIM), updates({"honest": sign * noise, "sybil": offset + sign * noise}))
    assert pull.pull("honest") == pytest.approx(0.0, abs=1e-4)
    assert pull.pull("sybil") == pytest.approx(float(offset.norm()), rel=1e-5)


def test_the_pull_is_relative_to_our_model_so_the_reference_cancels() -> None:
    """``delta_j - own``: moving the round's reference moves every offset and ours alike."""
    dirs = orthogonalish(3, DIM, 2)
    still, moved = PersistentPull(), PersistentPull()
    for r in range(5):
        shift = float(r) * dirs[2]
        still.observe(dirs[0], updates({"a": dirs[1]}))
        moved.observe(dirs[0] + shift, updates({"a": dirs[1] + shift}))
    assert moved.pull("a") == pytest.approx(still.pull("a"), rel=1e-5)
    assert still.pull("a") == pytest.approx(float((dirs[1] - dirs[0]).norm()), rel=1e-5)


def _warmed(pulls: dict[str, float], rounds: int = WARMUP_ROUNDS) -> tuple[PersistentPull, list]:
    axes = torch.eye(DIM)
    ups = updates({p: length * axes[i] for i, (p, length) in enumerate(pulls.items())})
    pull = PersistentPull()
    for _ in range(rounds):
        pull.observe(torch.zeros(DIM), ups)
    return pull, ups


def test_full_weight_up_to_the_median_pull_none_from_twice_it() -> None:
    """Pulls 1, 2, 3, 4: the (lower) median is 2; 3 keeps half its weight, 4 none."""
    pull, ups = _warmed({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    assert pull.scales(ups, torch.ones(4)).tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_nobody_is_judged_before_the_warmup() -> None:
    pull, ups = _warmed({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, WARMUP_ROUNDS - 1)
    assert pull.scales(ups, torch.ones(4)).tolist() == [1.0] * 4


def test_the_median_is_over_the_peers_we_trust() -> None:
    """Pulls 1..5: with the two longest muted the median is 2 (not 3), so a
    crowd of far-off identities cannot stretch the radius it is judged by."""
    pull, ups = _warmed({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0})
    everyone = pull.scales(ups, torch.ones(5)).tolist()
    assert everyone == pytest.approx([1.0, 1.0, 1.0, 2 - 4 / 3, 2 - 5 / 3])
    muted = pull.scales(ups, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])).tolist()
    assert muted == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])
    assert pull.scales(ups, torch.zeros(5)).tolist() == pytest.approx(everyone)  # none trusted: everyone's median


def test_a_peer_gone_for_forget_rounds_starts_a_fresh_mean() -> None:
    dirs = orthogonalish(2, DIM, 3)
    pull = PersistentPull()
    pull.observe(torch.zeros(DIM), updates({"a": dirs[0], "b": dirs[1]}))
    for _ in range(FORGET_ROUNDS + 1):
        pull.observe(torch.zeros(DIM), updates({"b": dirs[1]}))
    assert pull.pull("a") is None
    pull.observe(torch.zeros(DIM), updates({"a": 2 * dirs[1]}))
    assert pull.pull("a") == pytest.approx(2 * float(dirs[1].norm()), rel=1e-6)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        PersistentPull(beta=1.0)
    with pytest.raises(ValueError):
        PersistentPull(radius=0.0)
    with pytest.raises(ConfigError):
        get_aggregator("sybilwall", persistence=1.5)


class _LoneSybilUnderNoise:
    """Three honest peers whose public models carry fresh noise each round
    (as DP's) around a small drift of their own, and one Sybil at a fixed
    offset of its own without noise: nearer to us than any honest peer every
    round (the round's clip passes it), alone (nothing like it to compare),
    and it moves less than anyone."""

    def __init__(self) -> None:
        dirs = orthogonalish(4, DIM, 4)
        self.unit = [d / d.norm() for d in dirs]
        self.g = torch.Generator().manual_seed(5)

    def noise(self, scale: float) -> torch.Tensor:
        n = torch.randn(DIM, generator=self.g)
        return scale * n / n.norm()

    def run(self, agg: SybilWallAggregator, rounds: int) -> dict[str, float]:
        """The last of ``rounds`` rounds' weights."""
        weights: dict[str, float] = {}
        for _ in range(rounds):
            offsets = {f"h{i}": 0.2 * self.unit[i] + self.noise(2.0) for i in range(3)}
            offsets["sybil"] = 1.5 * self.unit[3]
            weights = agg.weigh(self.noise(1.0), updates(offsets), 4)
        return weights


def _wall(**opts: object) -> SybilWallAggregator:
    agg = get_aggregator("sybilwall", self_id=ME, **opts)
    assert isinstance(agg, SybilWallAggregator)
    return agg


def _lone_sybil_under_noise(rounds: int, **opts: object) -> dict[str, float]:
    return _LoneSybilUnderNoise().run(_wall(**opts), rounds)


def test_a_lone_sybil_with_a_fixed_offset_loses_its_weight_once_its_pull_stands_out() -> None:
    before = _lone_sybil_under_noise(WARMUP_ROUNDS - 1)
    assert before["sybil"] >= 0.95 * max(before[f"h{i}"] for i in range(3))  # nothing else catches it
    after = _lone_sybil_under_noise(30)
    assert after["sybil"] == 0.0
    assert all(after[f"h{i}"] > 0.15 for i in range(3))
    unbounded = _lone_sybil_under_noise(30, persistence=None)
    assert unbounded["sybil"] >= 0.95 * max(unbounded[f"h{i}"] for i in range(3))  # what the bound takes away


# --- checkpoints ------------------------------------------------------------------------


def _saved(state: dict) -> dict:
    """``state`` through torch.save / torch.load (weights only), as a checkpoint file is read back."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_the_running_means_survive_a_checkpoint_exactly() -> None:
    pull, ups = _warmed({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    again = PersistentPull()
    again.load_state_dict(_saved(pull.state_dict()))
    for peer in "abcd":
        assert again.pull(peer) == pytest.approx(pull.pull(peer), rel=1e-6)
    assert again.scales(ups, torch.ones(4)).tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0])  # judged at once
    # the forget clock is kept too: "a" unseen FORGET_ROUNDS + 1 rounds after the restart starts afresh
    for _ in range(FORGET_ROUNDS + 1):
        again.observe(torch.zeros(DIM), ups[1:])
    assert again.pull("a") is None and again.pull("b") == pytest.approx(2.0, rel=1e-6)


def test_a_state_without_the_means_starts_them_afresh_and_a_bad_one_is_refused() -> None:
    pull, _ = _warmed({"a": 1.0, "b": 2.0})
    pull.load_state_dict({})
    assert pull.pull("a") is None
    state = _warmed({"a": 1.0, "b": 2.0})[0].state_dict()
    with pytest.raises(ValueError):
        PersistentPull().load_state_dict({**state, "persistence_pulls": state["persistence_pulls"][:1]})
    with pytest.raises(ValueError):
        PersistentPull().load_state_dict({**state, "persistence_count": [0, 3]})


def test_a_restarted_wall_keeps_a_muted_lone_sybil_muted() -> None:
    """The node checkpoints SybilWall's state_dict (node/learner.py): a
    restart from it must not hand the Sybil WARMUP_ROUNDS rounds of full
    weight while the persistent means fill again."""
    scenario = _LoneSybilUnderNoise()
    wall = _wall()
    assert scenario.run(wall, 30)["sybil"] == 0.0
    restarted = _wall()
    restarted.load_state_dict(_saved(wall.state_dict()))
    for _ in range(WARMUP_ROUNDS):
        weights = scenario.run(restarted, 1)
        assert weights["sybil"] == 0.0
        assert all(weights[f"h{i}"] > 0.15 for i in range(3))
