"""The transport benches still run and end with their JSON line (the issue's
contract for every bench script), at the smallest size so this stays a few
seconds: real processes, sockets and crypto, figures only sanity-checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from murmur.learning.data import FASHION_MNIST_DIR
from tests.idx import write_idx_dir
from tests.integration.emulation import require_internet

ROOT = Path(__file__).resolve().parents[2]


def _last_json(script: str, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(150)
def test_transport_bench_reports_every_variant() -> None:
    out = _last_json("transport.py", "--sizes", "1", "--repeats", "1")
    for key in ("raw_mib_s_1", "murmur_mib_s_1", "sealed_mib_s_1", "murmur_fanout_mib_s_1", "standard_mib_s_1"):
        assert isinstance(out[key], float) and out[key] > 0, key
    assert 0 < out["ratio_ceiling_1"] <= 1
    assert out["connect_handshake_ms_median"] > 0 and out["standard_connect_handshake_ms_median"] > 0
    assert out["cipher"] == "Noise_XX_25519_AESGCM_SHA256"
    assert out["fast_path"] == ["/murmur/noise-fast/2.0.0", "/murmur/mux/2.0.0"]
    assert out["standard_path"] == ["/noise", "/yamux/1.0.0"]


@pytest.mark.timeout(150)
def test_crypto_pipeline_bench_reports_every_mode() -> None:
    out = _last_json("crypto_pipeline.py", "--sizes", "1", "--repeats", "1", "--rounds", "1")
    for mode in ("raw", "inline", "threaded"):
        assert out[f"{mode}_mib_s_1"] > 0, mode


@pytest.mark.timeout(150)
def test_compression_bench_reports_bytes_to_target() -> None:
    out = _last_json("compression.py", "--quick", "--rows", "int8", "--rounds", "20")
    rows = out["models"]["digits"]["rows"]
    assert set(rows) == {"fp32", "int8"}
    fp32, int8 = rows["fp32"], rows["int8"]
    assert fp32["reduction_vs_fp32"] == 1.0 and fp32["bytes_to_target"] > 0
    assert int8["message_bytes"] < fp32["message_bytes"] / 3  # a quarter of the payload, plus envelopes
    per_round, rest = divmod(int8["total_bytes"], int8["message_bytes"] * int8["rounds"])
    assert rest == 0 and 8 * 3 <= per_round <= 8 * 5  # one message per connection a round, degree about 4
    assert fp32["modelled_wall_s_total"] > 0


@pytest.mark.timeout(150)
def test_nat_bench_reports_relayed_against_direct() -> None:
    from tests.integration.emulation import require_internet

    require_internet()
    out = _last_json("nat.py", "--tries", "1", "--mib", "1", "--mbit", "100")
    assert out["direct_connect_ms"] > 0 and out["relayed_connect_ms"] > 0
    assert out["direct_mbit"] > 0 and 0 < out["relayed_vs_direct"] < 2  # type: ignore[operator]
    assert out["punched_share"] == 1.0 and out["punch_ms"] > 0 and out["punched_mbit"] > 0  # type: ignore[operator]


@pytest.mark.timeout(150)
def test_sybil_bench_privacy_row_runs_on_fashion_by_default(tmp_path: Path) -> None:
    """The privacy row's default setup is Fashion-MNIST (digits cannot learn
    at epsilon 1), and a cell runs under DECOR noise. Where Debian's
    dataset-fashion-mnist is absent (.ci/run installs it), files of the same
    format stand in through --data-dir."""
    data_dir: list[str] = []
    if not (FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").exists():
        write_idx_dir(tmp_path, size=28, train=2000, test=100)
        data_dir = ["--data-dir", str(tmp_path)]
    out = _last_json("sybil.py", "--privacy", "1", "--rounds", "2", "--rows", "label_flip:0",
                     "--aggregators", "sybilwall", *data_dir)
    setup = out["setup"]
    assert isinstance(setup, dict) and setup["trainer"] == "bench.privacy:FashionLinearTrainer"
    assert out["privacy_epsilon"] == 1.0 and out["problems"] == []
    cells = out["cells"]
    assert isinstance(cells, list) and len(cells) == 1 and 0.0 <= cells[0]["accuracy"] <= 1.0


@pytest.mark.timeout(150)
def test_collusion_bench_holds_the_budget_against_each_k() -> None:
    """Every plan calibrated against k colluders spends exactly its budget
    against the worst coalition of k, and the baseline plan (k = 0) more."""
    out = _last_json("collusion.py", "--graphs", "10x6", "--max-k", "2", "--rounds", "50")
    rows = out["rows"]
    assert {(r["level"], r["k"]) for r in rows} == {(lvl, k) for lvl in ("user", "example") for k in (0, 1, 2)}
    for r in rows:
        assert r["epsilon_vs_k"] == pytest.approx(10.0, rel=1e-3), r
        assert r["k"] == 0 or r["base_epsilon_vs_k"] > 10.05, r
        assert 0 < r["local_over_ldp"] <= 1.0 and r["seconds"] > 0


@pytest.mark.timeout(150)
def test_delayline_bench_adds_the_round_trip_it_sets() -> None:
    require_internet()  # skips only without root; as root (CI) it runs, or fails saying why
    out = _last_json("delayline.py", "--mib", "8", "--rated-s", "1", "--tries", "1", "--ms", "20", "--mbit", "20")
    assert out["line_mbit"] > 0 and out["plain_mbit"] > 0 and 0 <= out["line_cpu"] <= 2.0
    assert 0.5 <= out["rated_line_vs_plain"] <= 1.5, out  # both held to the same tbf rate
    assert out["rtt_expected_ms"] == 40.0
    assert 38.0 <= out["rtt_added_ms"] <= 80.0, out  # 20 ms each way; the line wakes late by a ms or so


@pytest.mark.timeout(150)
def test_accounting_bench_checks_the_cache_against_dp_accounting() -> None:
    """The bench exits non-zero where the cached ε differs from dp_accounting's;
    at a few rounds the cache must already be the faster."""
    out = _last_json("accounting.py", "--rounds", "5", "--repeats", "1")
    assert out["rounds"] == 5 and out["direct_s"] > 0 and out["cached_s"] > 0
    assert out["ratio"] > 1 and out["calibration_warm_s"] < out["calibration_cold_s"]
