"""The privacy outlook: the run's noise-to-signal, with known answers."""

from __future__ import annotations

import math

import pytest

from murmur.learning.privacy.outlook import OUTWEIGHS_RHO, outlook, run_noise_to_signal

DIGITS_MLP = 4810  # weights of digits-mlp: 64*64 + 64 + 64*10 + 10


def test_the_measured_runs_read_as_measured() -> None:
    """Four hand-started nodes, 100 rounds of digits: the plans' local noise
    (from the node's log) gives the rho the module doc quotes."""
    example = run_noise_to_signal(0.013145, DIGITS_MLP, 0.5, nodes=4, rounds=100)  # accuracy 0.84
    user = run_noise_to_signal(5.6843, DIGITS_MLP, 1.0, nodes=4, rounds=100)  # accuracy 0.11
    assert example == pytest.approx(0.0912, abs=1e-3)
    assert user == pytest.approx(19.71, abs=0.01)


def test_rho_scales_as_the_formula_says() -> None:
    base = run_noise_to_signal(1.0, 100, 1.0, nodes=1, rounds=1)
    assert base == pytest.approx(10.0)  # sqrt(100) / 1
    assert run_noise_to_signal(1.0, 100, 1.0, nodes=4, rounds=25) == pytest.approx(1.0)  # / sqrt(100)
    assert run_noise_to_signal(2.0, 100, 4.0, nodes=1, rounds=1) == pytest.approx(5.0)
    assert run_noise_to_signal(0.0, 100, 1.0, nodes=1, rounds=1) == 0.0


def test_the_outlook_carries_both_noises_and_says_when_noise_outweighs() -> None:
    seen = outlook(0.5, 2.0, 400, 1.0, nodes=4, rounds=25)
    assert seen.per_round == pytest.approx(10.0)
    assert seen.rho == pytest.approx(1.0) and seen.fallback_rho == pytest.approx(4.0)
    assert seen.outweighs and OUTWEIGHS_RHO == 1.0
    assert not outlook(0.49, 2.0, 400, 1.0, nodes=4, rounds=25).outweighs


@pytest.mark.parametrize("args", [(1.0, 0, 1.0, 1, 1), (1.0, 1, 0.0, 1, 1), (1.0, 1, 1.0, 0, 1), (1.0, 1, 1.0, 1, 0),
                                  (-1.0, 1, 1.0, 1, 1), (1.0, 1, math.nan, 1, 1)])
def test_nonsense_is_refused(args: tuple) -> None:
    with pytest.raises(ValueError):
        run_noise_to_signal(*args)
