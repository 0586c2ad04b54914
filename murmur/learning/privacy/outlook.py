"""Whether a privacy plan leaves a run anything to learn, told before it starts.

Why. A node started by hand with privacy switched on and every other option
at its default (user level, epsilon 10, a network of 10 nodes with 6
neighbours assumed) ran 60 rounds of digits in a network of four and ended at
accuracy 0.15-0.22 with a loss of ~2e5: its noise was ~2500 times the length
of any update it could send, and nothing said so. The same four nodes at
example level (DP-SGD) with their real size and rounds reached 0.84. A user
needs to hear that before the run, with the figure and what to change.

What. Over ``rounds`` rounds on ``nodes`` nodes the updates can move the
network's mean model by at most ``rounds * update_bound`` (every update as
long as the clip allows, all in one direction). The local noise, ``sigma``
per coordinate over ``dim`` coordinates, is drawn afresh by every node every
round, so in the mean it adds up to a random walk of length
``sigma * sqrt(dim * rounds / nodes)``; pairwise terms cancel in the mean
and do not count. Their ratio,

    rho = sigma * sqrt(dim) / (update_bound * sqrt(nodes * rounds)),

is the run's noise-to-signal at its most favourable. At rho >= 1 the noise
left in the mean model is longer than the most the whole run could learn,
and real updates are never all aligned: expect little of the model. It is
a ratio of lengths, and a classifier's decisions depend on some directions
more than others, so a model can keep something at rho > 1, but not much.
Measured with digits-mlp (4810 weights; 0.95 without privacy), 100 rounds on
four hand-started nodes (rho of the noise the rounds went out with): 0.09
gave accuracy 0.84; 0.20 (every round with the fallback's noise) 0.79; 0.52
(the same, noise calibrated for 1000 rounds) 0.40; 20 gave 0.11 (chance is
0.10); 25 (user level, every round with the fallback's noise) gave 0.14,
and 0.34 on two nodes over 20 rounds; 79 (the same over 1000 rounds) 0.23.

It is a bound on the mean model, not on one node's: a node's own model also
carries its neighbours' pairwise terms until mixing averages them out (the
calibration's ``residual_ratio``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

OUTWEIGHS_RHO = 1.0
"""At or above this, the noise in the mean model is longer than the most the run could learn."""


def outweighs(rho: float) -> bool:
    """Whether a run's noise-to-signal says the noise outweighs the learning
    (the node's WARNING, ``murmur status`` and the testnet report ask this)."""
    return rho >= OUTWEIGHS_RHO


@dataclass(frozen=True)
class NoiseOutlook:
    """Per round and over the run, for the noise with and without the pairwise
    edges (``fallback``: the local noise a round uses when too few edges are active)."""

    per_round: float  # sigma * sqrt(dim) / update_bound: one round's local noise against one update
    rho: float  # the run's noise-to-signal (module doc)
    fallback_rho: float  # the same with the fallback's local noise

    @property
    def outweighs(self) -> bool:
        return outweighs(self.rho)


def run_noise_to_signal(sigma: float, dim: int, update_bound: float, nodes: int, rounds: int) -> float:
    """``rho`` of the module doc (0 without noise)."""
    if dim < 1 or nodes < 1 or rounds < 1 or not update_bound > 0 or sigma < 0:
        raise ValueError("need dim, nodes, rounds >= 1, update_bound > 0, sigma >= 0")
    return sigma * math.sqrt(dim) / (update_bound * math.sqrt(nodes * rounds))


def outlook(sigma: float, fallback_sigma: float, dim: int, update_bound: float, nodes: int,
            rounds: int) -> NoiseOutlook:
    """The outlook of a plan whose local noise is ``sigma`` with its edges and
    ``fallback_sigma`` without, for updates at most ``update_bound`` long."""
    return NoiseOutlook(
        per_round=sigma * math.sqrt(dim) / update_bound,
        rho=run_noise_to_signal(sigma, dim, update_bound, nodes, rounds),
        fallback_rho=run_noise_to_signal(fallback_sigma, dim, update_bound, nodes, rounds),
    )
