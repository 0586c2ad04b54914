from __future__ import annotations

import pytest
import torch

from murmur.errors import ConfigError
from murmur.learning.aggregators import PeerUpdate, available_aggregators, get_aggregator
from murmur.learning.aggregators.krum import KrumAggregator, MultiKrumAggregator

REQUIRED = {"mean", "sybilwall", "foolsgold", "krum", "multi-krum", "median", "trimmed_mean", "clipped_gossip"}


def test_registry_has_every_required_name_and_instances_carry_it() -> None:
    assert REQUIRED <= set(available_aggregators())
    for name in available_aggregators():
        assert get_aggregator(name).name == name


def test_krum_and_multi_krum_are_distinct_registrations() -> None:
    k, mk = get_aggregator("krum"), get_aggregator("multi-krum")
    assert type(k) is KrumAggregator and type(mk) is MultiKrumAggregator
    assert k.options.m == 1 and mk.options.m is None


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("no-such-thing", {}),
        ("mean", {"tau": 1.0}),
        ("trimmed_mean", {"beta": 0.5}),
        ("clipped_gossip", {"tau": -1.0}),
        ("krum", {"f": -1}),
        ("sybilwall", {"gossip_lambda": 0.0}),
        ("foolsgold", {"memory": 0}),
        ("krum", {"f": "1"}),  # ill-typed: refused by name, not a TypeError inside validate()
        ("trimmed_mean", {"beta": True}),
    ],
)
def test_bad_names_and_options_are_config_errors(name: str, opts: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        get_aggregator(name, **opts)


def test_typed_options_are_applied() -> None:
    assert get_aggregator("trimmed_mean", beta=0.1).options.beta == 0.1


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_contract_violations_are_rejected(name: str) -> None:
    agg = get_aggregator(name)
    own = torch.zeros(4)
    with pytest.raises(ValueError):
        agg.aggregate(own, [PeerUpdate("a", torch.zeros(5))], 1)
    with pytest.raises(ValueError):
        agg.aggregate(own, [PeerUpdate("a", torch.zeros(4)), PeerUpdate("a", torch.zeros(4))], 2)
    with pytest.raises(ValueError):
        agg.aggregate(own, [PeerUpdate("self", torch.zeros(4))], 1)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_no_peers_returns_own_delta(name: str) -> None:
    own = torch.arange(6, dtype=torch.float32)
    res = get_aggregator(name).aggregate(own, [], 0)
    torch.testing.assert_close(res.delta, own)
    assert res.weights == {"self": 1.0}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_weights_sum_to_one_and_delta_is_fresh(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    own = torch.randn(50, generator=g)
    ups = [PeerUpdate(f"p{i}", torch.randn(50, generator=g), 4) for i in range(4)]
    before = own.clone()
    res = get_aggregator(name).aggregate(own, ups, 4)
    assert sum(res.weights.values()) == pytest.approx(1.0)
    assert set(res.weights) == {"self", "p0", "p1", "p2", "p3"}
    torch.testing.assert_close(own, before)  # inputs are never mutated
    assert res.delta.dtype == torch.float32 and res.delta.shape == own.shape


def test_the_torch_free_catalog_lists_every_registered_aggregator() -> None:
    from murmur.learning.catalog import AGGREGATORS

    assert AGGREGATORS == set(available_aggregators())
