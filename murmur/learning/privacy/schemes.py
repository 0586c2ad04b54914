"""The privacy vocabulary the config names (``[privacy]`` scheme, level,
objective), apart from the maths: the config imports these, and a light
command (``murmur id``, ``murmur config check``) must not pay for scipy, cvxpy
and torch, which :mod:`.calibration` needs."""

from __future__ import annotations

import enum


class PrivacyScheme(enum.StrEnum):
    DECOR = "decor"  # pairwise correlated noise (Allouah et al., ICML 2024)
    CORN = "corn"  # optimised per-edge correlated noise
    LDP = "ldp"  # independent local Gaussian noise only
    NONE = "none"


class PrivacyLevel(enum.StrEnum):
    USER = "user"
    EXAMPLE = "example"


class NoiseObjective(enum.StrEnum):
    """What the split between local and pairwise noise minimises (the privacy
    constraint max_i [Σ⁻¹]_ii is the same for both).

    ONE_STEP: tr(WΣWᵀ), the noise left after one mixing step (CorN's objective,
    Rodio, Chen, Larsson 2025). It prices pairwise noise as if it were left in
    the models, so on sparse graphs it keeps σ_cor small and σ_cdp far above
    central DP (torus: σ_cdp ≈ 0.65·σ_ldp vs central 0.25·σ_ldp).

    RUN: the noise left in the models after all T rounds of D-SGD mixing,
    (1/n)·Σ_{k=1..T} tr(W^k Σ W^k) (the gradient's own contraction ignored).
    The network mean carries only the local part and keeps all T rounds of it
    (weight T·σ_cdp²/n), while pairwise noise lives where mixing contracts it
    every round (a geometric sum), so over a run it is far cheaper; this picks
    large σ_cor and σ_cdp near central DP — the regime of DECOR's anchors.
    """

    ONE_STEP = "one_step"
    RUN = "run"
    #: the node's default: RUN where the node trains from its public model
    #: (example level), ONE_STEP where it keeps a private model (user level) —
    #: there the pairwise terms its neighbours' public models carry are mixed
    #: into the private model every round and never cancel in it, which is the
    #: one-step residual (digits, 8 nodes, user level, 20 rounds: 0.19–0.22
    #: accuracy with ONE_STEP vs 0.14–0.18 with RUN; example level: RUN 0.722
    #: vs ONE_STEP 0.661 at eps 0.1, bench/privacy.py).
    AUTO = "auto"

    def resolve(self, level: PrivacyLevel) -> NoiseObjective:
        """The concrete objective for a node protecting at ``level``."""
        if self is not NoiseObjective.AUTO:
            return self
        return NoiseObjective.RUN if level is PrivacyLevel.EXAMPLE else NoiseObjective.ONE_STEP
