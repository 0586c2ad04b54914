"""What ``/status`` and ``/metrics`` tell an operator about a node's rounds:
target and done, ε against the budget, per-round phase histograms with no
NaN or ``_created`` series, and the accuracy a restarted node had."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from murmur.node.daemon import Node
from tests.integration.cluster import Cluster, wait_until

N = 3
ROUNDS, MIXING = 3, 1
RUN_S = 90.0
OVERRIDES: dict[str, Any] = {
    "learning.enabled": True,
    "learning.trainer": "digits-mlp",
    "learning.num_nodes": N,
    "learning.threads": 1,
    "learning.local_steps": 2,
    "learning.device": "cpu",
    "learning.round_deadline_s": 4.0,
    "learning.rounds": ROUNDS,
    "learning.mixing_rounds": MIXING,
    "network.neighbours": N - 1,
    "privacy.enabled": True,
    "privacy.epsilon": 10.0,
    "privacy.rounds": 1000,
}

pytestmark = pytest.mark.timeout(180)


async def _get(node: Node, path: str) -> tuple[int, str]:
    url = node.state.read_api_info().url
    async with aiohttp.ClientSession() as http, http.get(url + path) as resp:
        return resp.status, await resp.text()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_status_says_target_done_and_budget_and_metrics_have_round_histograms(tmp_path: Path) -> None:
    async with Cluster(N, tmp_path, overrides=OVERRIDES) as cluster:
        first = cluster.node(0).status()["learning"]
        assert first["target_rounds"] == ROUNDS + MIXING
        assert first["epsilon_budget"] == 10.0 and first["delta"] == 1e-5
        assert first["state"] in ("training", "mixing", "done")
        await wait_until(lambda: all(n.status()["learning"]["done"] for n in cluster), RUN_S, "every node done")
        for node in cluster:
            learning = node.status()["learning"]
            assert learning["state"] == "done" and learning["round"] == ROUNDS + MIXING
            assert 0.0 < learning["epsilon_spent"] <= learning["epsilon_budget"]
            assert set(learning["last_round_s"]) >= {"train", "send", "wait", "aggregate", "eval"}

            code, text = await _get(node, "/metrics")
            assert code == 200
            assert "_created" not in text and "NaN" not in text
            samples = _samples(text)
            rows = node.state.read_metrics()
            assert rows[-1]["round"] == ROUNDS + MIXING - 1  # done: the last round is on disk, not only aggregated
            assert samples[("murmur_round_seconds_count", ())] == len(rows)
            # the histogram's sum is the rows' phase times, summed
            phases = ("train_s", "commit_s", "send_s", "wait_s", "aggregate_s", "eval_s")
            total = sum(row.get(p, 0.0) for row in rows for p in phases)
            assert samples[("murmur_round_seconds_sum", ())] == pytest.approx(total, abs=1e-3 * len(rows))
            assert samples[("murmur_round_phase_seconds_count", (("phase", "commit"),))] == len(rows)
            assert ("murmur_accuracy", (("split", "train"),)) not in samples  # training measures no accuracy

        # a restarted node that has no rounds left still says what it reached
        last = cluster.node(1).state.last_metrics()
        assert last is not None
        await cluster.stop(1)
        back = await cluster.restart(1)
        learning = back.status()["learning"]
        assert learning["accuracy"] == last["accuracy"] and learning["evaluated_round"] == last["round"]
        assert learning["done"] is True
        _, text = await _get(back, "/metrics")
        assert _samples(text)[("murmur_accuracy", (("split", "test"),))] == pytest.approx(last["accuracy"])
