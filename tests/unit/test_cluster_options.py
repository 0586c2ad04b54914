"""``[cluster]`` in a scenario and ``murmur testnet run --cluster``: parsing,
the override, the node configs of a cluster run, and the one line a user
without Ray gets (no Ray needed: Ray is made unimportable here)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from murmur.errors import ConfigError
from murmur.node.config import load_config
from murmur.node.cli import main as murmur_main
from murmur.testnet import cli as testnet_cli
from murmur.testnet.options import cluster_choice
from murmur.testnet.scenario import Backend, NodePlace, Placement, dump_toml, node_configs, parse_scenario

BASE = """
name = "c"
nodes = 4
[duration]
rounds = 5
"""


def test_cluster_defaults_to_this_machine() -> None:
    sc = parse_scenario(BASE)
    assert sc.cluster.backend is Backend.LOCAL
    assert sc.cluster.address is None
    assert sc.cluster.placement is Placement.SPREAD
    assert sc.cluster.gpus_per_node == 0.0


def test_cluster_section_parses() -> None:
    sc = parse_scenario(BASE + """
[cluster]
backend = "ray"
address = "198.18.0.1:6379"
placement = "pack"
cpus_per_node = 0.5
gpus_per_node = 0.125
labels = { zone = "a", "ray.io/accelerator-type" = "H100" }
""")
    assert dict(sc.cluster.labels) == {"zone": "a", "ray.io/accelerator-type": "H100"}
    assert sc.cluster.backend is Backend.RAY
    assert sc.cluster.address == "198.18.0.1:6379"
    assert sc.cluster.placement is Placement.PACK
    assert (sc.cluster.cpus_per_node, sc.cluster.gpus_per_node) == (0.5, 0.125)


@pytest.mark.parametrize(("line", "message"), [
    ('backend = "k8s"', "cluster.backend: unknown backend 'k8s'"),
    ('placement = "everywhere"', "cluster.placement: unknown placement 'everywhere'"),
    ("gpus_per_node = 2", "cluster.gpus_per_node: must be in [0.0, 1.0]"),
    ("cpus_per_node = 0", "cluster.cpus_per_node"),
    ("labels = { zone = 1 }", "cluster.labels: values must be strings, 'zone' is not"),
])
def test_bad_cluster_fields_name_their_line(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(BASE + "[cluster]\n" + line + "\n", "s.toml")
    assert str(err.value).startswith("s.toml:7: ")
    assert message in str(err.value)


def test_cluster_choice() -> None:
    assert cluster_choice("ray") == ("ray", None)
    assert cluster_choice("ray=10.0.0.1:6379") == ("ray", "10.0.0.1:6379")
    assert cluster_choice("local") == ("local", None)
    for bad in ("k8s", "local=10.0.0.1:6379", "ray="):
        with pytest.raises(argparse.ArgumentTypeError):
            cluster_choice(bad)


def test_cluster_flag_overrides_the_scenario() -> None:
    sc = parse_scenario(BASE + '[cluster]\nbackend = "ray"\naddress = "a:1"\nplacement = "pack"\n')
    assert testnet_cli.with_cluster(sc, None) is sc
    local = testnet_cli.with_cluster(sc, ("local", None))
    assert local.cluster.backend is Backend.LOCAL
    moved = testnet_cli.with_cluster(parse_scenario(BASE), ("ray", "b:2"))
    assert (moved.cluster.backend, moved.cluster.address) == (Backend.RAY, "b:2")
    kept = testnet_cli.with_cluster(sc, ("ray", None))  # a bare --cluster ray keeps the scenario's address
    assert (kept.cluster.address, kept.cluster.placement) == ("a:1", Placement.PACK)


@pytest.mark.parametrize("how", ["flag", "scenario"])
def test_ray_run_without_ray_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str], how: str) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE + ('[cluster]\nbackend = "ray"\n' if how == "scenario" else ""), encoding="utf-8")
    out = tmp_path / "run"
    argv = ["testnet", "run", str(scenario), "--out", str(out), "--no-dashboard"]
    code = murmur_main(argv + (["--cluster", "ray"] if how == "flag" else []))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["murmur: a Ray cluster run needs Ray: pip install 'murmur[ray]'"]
    assert not out.exists()  # refused before anything was written or started


def test_node_configs_of_a_cluster_run_listen_on_their_hosts(tmp_path: Path) -> None:
    sc = parse_scenario(BASE)
    hosts = ["198.18.0.2", "198.18.0.2", "198.18.0.3", "198.18.0.4"]
    places = {i: NodePlace(h, 30000 + i, Path("/srv/run/nodes") / f"node{i}", "cuda" if i == 3 else None)
              for i, h in enumerate(hosts)}
    configs = node_configs(sc, tmp_path, places=places)
    for i, cfg in enumerate(configs):
        assert cfg["node"]["listen"] == [f"/ip4/{hosts[i]}/tcp/{30000 + i}"]
        assert cfg["node"]["data_dir"] == f"/srv/run/nodes/node{i}"
        assert cfg["api"]["host"] == "127.0.0.1"  # the API stays on its host's loopback
        for addr in cfg["network"]["bootstrap"]:
            j = next(j for j in range(4) if f"/tcp/{30000 + j}/" in addr)
            assert addr.startswith(f"/ip4/{hosts[j]}/tcp/{30000 + j}/p2p/")
        path = tmp_path / f"node{i}.toml"
        path.write_text(dump_toml(cfg), encoding="utf-8")
        loaded = load_config(path)
        assert loaded.learning.device == ("cuda" if i == 3 else "cpu")
    # without places: loopback and the state dirs under workdir, as before
    local = node_configs(sc, tmp_path, 41000)
    assert local[2]["node"]["listen"] == ["/ip4/127.0.0.1/tcp/41002"]
    assert local[2]["node"]["data_dir"] == str(tmp_path / "node2")


def test_the_readme_cluster_section_parses() -> None:
    """The README's [cluster] example is a scenario section that loads as shown."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("```toml\n[cluster]\n", 1)[1].split("```", 1)[0]
    sc = parse_scenario(BASE + "[cluster]\n" + block)
    assert sc.cluster.backend is Backend.RAY
    assert sc.cluster.address == "10.0.0.1:6379"
    assert sc.cluster.gpus_per_node == 0.125
    assert dict(sc.cluster.labels) == {"zone": "a"}


def test_gpu_fractions_without_ray_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A local run cannot place nodes on GPU fractions: one line, exit 2, nothing started."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE + "[cluster]\ngpus_per_node = 0.5\n", encoding="utf-8")
    out = tmp_path / "run"
    assert murmur_main(["testnet", "run", str(scenario), "--out", str(out), "--no-dashboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('murmur: config error: [cluster] gpus_per_node needs backend = "ray"')
    assert not out.exists()


def test_emulated_internet_on_ray_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """[network] builds namespaces on this machine; a Ray run places nodes on
    other hosts: the two do not combine, and a user is told so at once."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE + '[cluster]\nbackend = "ray"\n[network]\nup_mbit = 20.0\n', encoding="utf-8")
    out = tmp_path / "run"
    assert murmur_main(["testnet", "run", str(scenario), "--out", str(out), "--no-dashboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[network]" in err[0] and "Ray" in err[0]
    assert not out.exists()
