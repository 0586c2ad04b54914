"""What `murmur node start` can only find out once it loads its data set is
still one line naming the file, line and key to change, and exit 2 (not restarted by the
systemd unit), from a real daemon process."""

from __future__ import annotations

from tests.integration.daemons import DaemonPool

EXIT_CONFIG = 2
EXIT_S = 60.0  # an interpreter importing torch on a shared 2-core box
DIGITS_TRAIN = 1438  # scikit-learn's digits, less the test split


def test_more_nodes_than_samples_names_num_nodes(pool: DaemonPool) -> None:
    daemon = pool.add({
        "node": {"listen": ["/ip4/127.0.0.1/tcp/0"], "log_level": "info"},
        "api": {"port": 0},
        "learning": {"trainer": "digits-mlp", "num_nodes": DIGITS_TRAIN + 1},
    })
    pool.spawn(daemon)
    assert daemon.proc is not None
    assert daemon.proc.wait(EXIT_S) == EXIT_CONFIG
    last = daemon.log[-1].read_text().splitlines()[-1]
    # located like any other config error: the file and line to edit
    assert last.startswith(f"murmur: config error: {daemon.config}:"), last
    assert ": learning.num_nodes: " in last, last
    assert f"{DIGITS_TRAIN} training samples cannot fill {DIGITS_TRAIN + 1} nodes" in last, last
    assert not daemon.state.api_path.exists()
