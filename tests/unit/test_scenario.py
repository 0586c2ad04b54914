"""Scenario parsing: the embedded default, per-node configs and error lines."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from murmur.errors import ConfigError
from murmur.learning.tactics import AttackPlan, Tactic
from murmur.node.config import load_config
from murmur.protocol.multiaddr import Multiaddr
from murmur.testnet.scenario import (
    DEFAULT_ROUND_OF,
    Action,
    AttackKind,
    Reference,
    Role,
    RoundOf,
    default_scenario_text,
    dump_toml,
    find_line,
    load_runnable_scenario,
    load_scenario,
    node_configs,
    parse_scenario,
    process_groups,
)

BASE = """\
nodes = 4

[topology]
degree = 2

[duration]
rounds = 20
"""


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(textwrap.dedent(body))
    return path


def test_default_scenario_matches_the_issue() -> None:
    sc = load_scenario(None)
    assert sc.nodes == 8
    assert sc.trainer.spec == "digits-mlp"
    assert sc.aggregator.name == "sybilwall"
    assert sc.privacy.enabled
    assert len(sc.attackers) == 1
    assert sc.attackers[0].kind is AttackKind.LABEL_FLIP and sc.attackers[0].sybils == 2
    assert sc.attackers[0].tactic is Tactic.DIVERSIFIED  # the adaptive attacker (issue 15)
    assert [ev.action for ev in sc.churn] == [Action.CRASH, Action.RESTART]
    assert sc.churn[0].nodes == sc.churn[1].nodes
    # sized for < 3 minutes on 2 cores: the round deadline bounds the round phase
    assert sc.duration.last_round is not None
    assert sc.duration.last_round * sc.duration.round_deadline_s <= 120


def test_node_specs_number_honest_then_sybils() -> None:
    sc = load_scenario(None)
    specs = sc.node_specs()
    assert [s.name for s in specs] == [f"node{i}" for i in range(8)] + ["sybil0-0", "sybil0-1"]
    assert [s.role for s in specs].count(Role.ATTACKER) == 2
    # both Sybils share one data partition so they send the same model
    assert specs[8].data_index == specs[9].data_index == 8


def test_node_configs_load_as_real_node_configs(tmp_path: Path) -> None:
    sc = load_scenario(None)
    configs = node_configs(sc, tmp_path, base_port=42000)
    assert len(configs) == 10
    peer_ids = set()
    for i, cfg in enumerate(configs):
        path = tmp_path / f"n{i}.toml"
        path.write_text(dump_toml(cfg))
        loaded = load_config(path)  # the node's own parser accepts what we generate
        assert loaded.node.listen[0].port == 42000 + i
        assert loaded.learning.num_nodes == 9 and loaded.learning.rounds == sc.duration.rounds == 40
        assert loaded.learning.mixing_rounds == sc.duration.mixing_rounds == 5
        assert loaded.privacy.enabled and loaded.learning.aggregator == "sybilwall"
        assert (tmp_path / specs_name(i) / "identity.key").exists()
        peer_ids.add(str(loaded.node.data_dir))
        for boot in loaded.network.bootstrap:
            assert boot.peer_id is not None  # authenticated dials
    assert len(peer_ids) == 10
    sybil = load_config(_dump(tmp_path, configs[8]))
    assert sybil.learning.attack.value == "label_flip"
    assert len(sybil.network.bootstrap) == sc.attackers[0].edges_per_sybil
    # Sybils dial honest nodes only; honest nodes never bootstrap to a Sybil
    honest_ports = {42000 + i for i in range(8)}
    assert {b.port for b in sybil.network.bootstrap} <= honest_ports
    for cfg in configs[:8]:
        assert {Multiaddr.parse(b).port for b in cfg["network"]["bootstrap"]} <= honest_ports


def specs_name(i: int) -> str:
    return f"node{i}" if i < 8 else f"sybil0-{i - 8}"


def _dump(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "one.toml"
    path.write_text(dump_toml(cfg))
    return path


def test_identities_are_stable_across_calls(tmp_path: Path) -> None:
    sc = load_scenario(None)
    first = node_configs(sc, tmp_path, 43000)
    again = node_configs(sc, tmp_path, 43000)
    assert first[0]["network"]["bootstrap"] == again[0]["network"]["bootstrap"]


def test_honest_graph_is_connected_from_bootstrap(tmp_path: Path) -> None:
    sc = parse_scenario(BASE.replace("nodes = 4", "nodes = 12").replace("degree = 2", "degree = 4"))
    configs = node_configs(sc, tmp_path, 44000)
    adj = {i: {Multiaddr.parse(b).port - 44000 for b in c["network"]["bootstrap"]} for i, c in enumerate(configs)}
    seen, todo = {0}, [0]
    while todo:
        i = todo.pop()
        for j in adj[i] | {k for k, v in adj.items() if i in v}:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    assert seen == set(range(12))
    assert all(len(v) >= 2 for v in adj.values())


def test_churned_nodes_get_their_own_process() -> None:
    sc = parse_scenario(BASE.replace("nodes = 4", "nodes = 6\nnodes_per_process = 3") + """
[[churn]]
at_round = 2
action = "crash"
nodes = [4]
""")
    groups = process_groups(sc)
    assert [4] in groups
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert max(len(g) for g in groups) <= 3


def test_unknown_action_names_line_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + """
[[churn]]
at_round = 1
action = "stop"
nodes = [1]

[[churn]]
at_round = 2
action = "restart"
nodes = [1]

[[churn]]
at_round = 3
action = "crashh"
nodes = [2]
""")
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "crashh" in text)
    assert str(info.value) == (
        f"{path}:{line}: churn[2].action: unknown action 'crashh' "
        "(expected one of crash, stop, restart, partition, heal, latency, loss, join)"
    )


@pytest.mark.parametrize(
    ("snippet", "needle", "message"),
    [
        ("[trainer]\nlocal_steps = 0\n", "local_steps", "trainer.local_steps: must be >= 1, got 0"),
        ("[privacy]\nepsilon = \"big\"\n", "epsilon", "privacy.epsilon: must be a number, got 'big'"),
        ("[partition]\nkind = \"zipf\"\n", "kind", "partition.kind: unknown kind 'zipf' (expected one of iid, dirichlet, shards)"),
        ("[aggregator]\nnam = \"krum\"\n", "nam", "aggregator.nam: unknown field (known: name, options)"),
        ("[[attackers]]\nkind = \"label_flip\"\nsybils = 0\n", "sybils", "attackers[0].sybils: must be >= 1, got 0"),
        ("[[attackers]]\nkind = \"poison\"\n", "poison", "attackers[0].kind: unknown kind 'poison' (expected one of label_flip, backdoor)"),
        ("[[attackers]]\ntactic = \"mimic\"\n", "mimic", "attackers[0].tactic: unknown tactic 'mimic' "
         "(expected one of identical, diversified, unscored, forged_records, sleeper)"),
        ("[[attackers]]\ntactic = \"diversified\"\nboost = 0\n", "boost", "attackers[0].boost: must be a finite number > 0, got 0.0"),
        ("[[attackers]]\ntactic = \"sleeper\"\nsleep_rounds = -1\n", "sleep_rounds", "attackers[0].sleep_rounds: must be >= 0, got -1"),
        ("[[churn]]\nat_round = 3\naction = \"loss\"\n", "[[churn]]", "churn[0].percent: is required for loss"),
        ("[[churn]]\nat_round = 30\naction = \"heal\"\n", "at_round = 30", "churn[0].at_round: must be < duration.rounds (20)"),
        ("[[churn]]\nat_round = 3\naction = \"crash\"\nnodes = [9]\n", "nodes = [9]", "churn[0].nodes: node index 9 out of range (0..3)"),
        ("[[churn]]\nat_round = 3\naction = \"restart\"\nnodes = [1]\n", "nodes = [1]",
         "churn[0].nodes: restart of node 1, which no earlier event crashed or stopped"),
        ("[[churn]]\nat_round = 3\nat_s = 2.0\naction = \"heal\"\n", "[[churn]]", "churn[0]: give exactly one of at_round or at_s"),
        ("[[churn]]\nat_round = 3\naction = \"partition\"\nnodes = [0, 1, 2, 3]\n", "nodes = [0, 1, 2, 3]",
         "churn[0].nodes: a partition needs nodes on both sides"),
        ("[[churn]]\nat_round = 3\nround_of = \"mean\"\naction = \"heal\"\n", "round_of",
         "churn[0].round_of: unknown round_of 'mean' (expected one of front, median, slowest, "
         "or an honest node's name: node0, node1, ...)"),
        ("[[churn]]\nat_round = 3\nround_of = \"node\"\naction = \"heal\"\n", "round_of",
         "churn[0].round_of: unknown round_of 'node' (expected one of front, median, slowest, "
         "or an honest node's name: node0, node1, ...)"),
        ("[[churn]]\nat_round = 3\nround_of = 3\naction = \"heal\"\n", "round_of",
         "churn[0].round_of: must be a string, got 3"),
        ("[[churn]]\nat_round = 3\nround_of = \"node4\"\naction = \"heal\"\n", "round_of",
         "churn[0].round_of: names no honest node (node0..node3)"),
        ("[[churn]]\nat_s = 3.0\nround_of = \"front\"\naction = \"heal\"\n", "round_of",
         "churn[0].round_of: only applies to at_round"),
        ("[[churn]]\nat_round = 15\naction = \"heal\"\n[[churn]]\nat_round = 7\naction = \"heal\"\n", "at_round = 7",
         "churn[1].at_round: 7 comes after churn[0] at 15: events fire in file order, so this one would wait "
         "for that one; list them in order"),
        ("[[churn]]\nat_s = 9.5\naction = \"heal\"\n[[churn]]\nat_s = 2.5\naction = \"heal\"\n", "at_s = 2.5",
         "churn[1].at_s: 2.5 comes after churn[0] at 9.5: events fire in file order, so this one would wait "
         "for that one; list them in order"),
    ],
)
def test_errors_name_line_and_field(tmp_path: Path, snippet: str, needle: str, message: str) -> None:
    path = _write(tmp_path, BASE + "\n" + snippet)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text)
    assert str(info.value) == f"{path}:{line}: {message}"


NO_COUNTER = ("no honest node is up to count rounds when this event is due (the events before it leave every one "
              "down or not yet joined): it would never fire; give it at_s instead")


@pytest.mark.parametrize(
    ("churn", "needle", "message"),
    [
        ('[[churn]]\nat_round = 2\naction = "join"\nnodes = [0, 1, 2, 3]\n', "at_round = 2",
         f"churn[0].at_round: {NO_COUNTER}"),
        ('[[churn]]\nat_round = 3\naction = "crash"\nnodes = [0, 1, 2, 3]\n'
         '[[churn]]\nat_round = 6\naction = "restart"\nnodes = [0, 1, 2, 3]\n', "at_round = 6",
         f"churn[1].at_round: {NO_COUNTER}"),
        ('[[churn]]\nat_round = 3\naction = "stop"\nnodes = [0]\n'
         '[[churn]]\nat_round = 6\nround_of = "node0"\naction = "heal"\n', "round_of",
         "churn[1].round_of: node0 is not up when this event is due (the events before it leave it down or not yet "
         "joined): it would never fire"),
    ],
)
def test_an_event_no_live_honest_node_can_count_rounds_for_is_refused(
        tmp_path: Path, churn: str, needle: str, message: str) -> None:
    """Such an event never fired, nor any after it: the run sat out the
    stall bound (60 s) and ended 'stalled' (exit 1)."""
    path = _write(tmp_path, BASE + "\n" + churn)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text)
    assert str(info.value) == f"{path}:{line}: {message}"


@pytest.mark.parametrize("churn", [
    '[[churn]]\nat_round = 3\naction = "crash"\nnodes = [0, 1, 2]\n'  # node3 counts on
    '[[churn]]\nat_round = 6\naction = "restart"\nnodes = [0, 1, 2]\n',
    '[[churn]]\nat_s = 1.0\naction = "join"\nnodes = [0, 1, 2, 3]\n'  # time needs no counter
    '[[churn]]\nat_round = 6\naction = "heal"\n',
    '[[churn]]\nat_round = 3\naction = "crash"\nnodes = [0, 1, 2, 3]\n'
    '[[churn]]\nat_s = 9.0\naction = "restart"\nnodes = [0, 1, 2, 3]\n'
    '[[churn]]\nat_round = 12\nround_of = "node2"\naction = "heal"\n',
])
def test_events_some_live_honest_node_counts_rounds_for_are_accepted(tmp_path: Path, churn: str) -> None:
    load_scenario(_write(tmp_path, BASE + "\n" + churn))


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ('name = "x/../../../escaped"', "name: must be 1-64 letters, digits, '.', '_' or '-' (not first), got"),
        ('name = ".hidden"', "name: must be 1-64 letters"),
        ("seed = -1", "seed: must be in [0, 4294967295], got -1"),  # workers started, then every node failed
        ("nodes = 20000", "nodes: must be in [1, 4096], got 20000"),  # a traceback after 12000 identities
    ],
)
def test_top_level_fields_are_checked_before_anything_starts(tmp_path: Path, top: str, message: str) -> None:
    path = _write(tmp_path, top + "\n" + BASE.replace("nodes = 4\n", "" if top.startswith("nodes") else "nodes = 4\n"))
    with pytest.raises(ConfigError, match=re.escape(f"{path}:1: {message}")):
        load_scenario(path)


def test_the_trainer_device_is_one_trainers_run_on(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + '\n[trainer]\ndevice = "meta"\n')
    with pytest.raises(ConfigError, match="trainer.device: device 'meta' is not one of auto, cpu, cuda, mps"):
        load_scenario(path)


def test_an_attackers_tactic_runs_at_its_tuned_strength_unless_the_scenario_sets_one() -> None:
    sc = parse_scenario(BASE + textwrap.dedent("""
        [[attackers]]
        sybils = 2

        [[attackers]]
        tactic = "sleeper"
        sleep_rounds = 4
        fresh = 0.5
    """))
    assert sc.attackers[0].plan() == AttackPlan.tuned(Tactic.IDENTICAL)
    assert sc.attackers[1].plan() == dataclasses.replace(AttackPlan.tuned(Tactic.SLEEPER), sleep_rounds=4, fresh=0.5)


def test_round_of_names_whose_round_an_event_counts() -> None:
    sc = parse_scenario(BASE + textwrap.dedent("""
        [[churn]]
        at_round = 3
        action = "heal"

        [[churn]]
        at_round = 4
        round_of = "slowest"
        action = "heal"

        [[churn]]
        at_round = 5
        round_of = "node2"
        action = "heal"

        [[churn]]
        at_s = 1.0
        action = "heal"
    """))
    assert [ev.round_of for ev in sc.churn] == [None, RoundOf(Reference.SLOWEST), RoundOf(Reference.NODE, 2), None]
    assert [str(ev.reference) for ev in sc.churn] == ["median", "slowest", "node2", "median"]  # the default: median
    assert DEFAULT_ROUND_OF == RoundOf(Reference.MEDIAN)


def test_duration_needs_exactly_one_bound() -> None:
    with pytest.raises(ConfigError, match=r"scenario.toml:6: duration: give exactly one of rounds"):
        parse_scenario(BASE.replace("rounds = 20", "rounds = 20\nseconds = 60.0"))
    timed = parse_scenario(BASE.replace("rounds = 20", "seconds = 60.0"))
    assert timed.duration.seconds == 60.0 and timed.duration.rounds is None


def test_find_line_resolves_array_elements_and_inline_tables() -> None:
    text = "[trainer]\noptions = { lr = 0.1 }\n[[churn]]\naction = 'a'\n[[churn]]\n# c\naction = 'b'\n"
    assert find_line(text, ("churn", 1, "action")) == 7
    assert find_line(text, ("churn", 0, "action")) == 4
    assert find_line(text, ("trainer", "options", "lr")) == 2
    assert find_line(text, ("nowhere",)) is None


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        parse_scenario("nodes = = 3")
    with pytest.raises(ConfigError, match="cannot read"):
        load_scenario(tmp_path / "absent.toml")


def test_mixing_rounds_reach_the_nodes_and_need_a_round_bound(tmp_path: Path) -> None:
    assert parse_scenario(BASE.replace("rounds = 20", "rounds = 20\nmixing_rounds = 5")).duration.last_round == 25
    default = load_scenario(None)
    sc = dataclasses.replace(default, duration=dataclasses.replace(default.duration, mixing_rounds=7))
    loaded = load_config(_dump(tmp_path, node_configs(sc, tmp_path, base_port=45000)[0]))
    assert loaded.learning.rounds == default.duration.rounds and loaded.learning.mixing_rounds == 7
    with pytest.raises(ConfigError, match="mixing_rounds: needs duration.rounds"):
        parse_scenario(BASE.replace("rounds = 20", "seconds = 60.0\nmixing_rounds = 5"))


SHIPPED_SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "murmur" / "testnet" / "scenarios").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED_SCENARIOS, ids=lambda p: p.name)
def test_shipped_scenarios_give_configs_the_node_accepts(tmp_path: Path, path: Path) -> None:
    """Every example scenario parses, and each node config it generates loads
    with the node's own parser."""
    sc = load_scenario(path)
    for i, cfg in enumerate(node_configs(sc, tmp_path, base_port=43000)):
        loaded = load_config(_dump(tmp_path, cfg))
        assert loaded.learning.rounds == sc.duration.rounds, i


def test_the_dpsgd_example_is_one_dp_sgd_step_per_round() -> None:
    sc = load_scenario(next(p for p in SHIPPED_SCENARIOS if p.name == "dpsgd.toml"))
    assert sc.privacy.level.value == "example" and sc.trainer.local_steps == 1
    assert sc.trainer.options["dp_clip"] > 0 and sc.trainer.options["momentum"] == 0


@pytest.mark.parametrize("nodes", [2, 3, 4, 7])
def test_small_networks_get_configs_their_nodes_accept(tmp_path: Path, nodes: int) -> None:
    """Under 8 nodes the view is smaller than the default shuffle length: the
    nodes refused their own configs (network.shuffle_length) and never started."""
    sc = parse_scenario(BASE.replace("nodes = 4", f"nodes = {nodes}").replace("degree = 2", f"degree = {min(2, nodes - 1)}"))
    for cfg in node_configs(sc, tmp_path, base_port=46000):
        network = load_config(_dump(tmp_path, cfg)).network
        assert network.shuffle_length <= network.view_size == nodes


@pytest.mark.parametrize(
    ("section", "field", "message"),
    [
        ('[trainer]\nspec = "digits-mpl"\n', "trainer.spec", "unknown trainer 'digits-mpl'"),
        ('[trainer]\nspec = "nomod:Trainer"\n', "trainer.spec", "cannot import module 'nomod'"),
        ('[trainer]\noptions = { lr = "fast" }\n', "trainer.options", "option lr must be float"),
        ('[trainer]\ndevice = "cuda:99"\n', "trainer.device", "device 'cuda:99' requested but"),
        ('[aggregator]\nname = "sybilwal"\n', "aggregator.name", "unknown aggregator 'sybilwal'"),
        ('[aggregator]\nname = "krum"\noptions = { f = "1" }\n', "aggregator.options", "option f must be int"),
        # workers were started, and then every node refused it
        ('[privacy]\nenabled = true\nlevel = "example"\n', "privacy.level", '"example" needs one DP-SGD step'),
    ],
)
def test_runnable_scenario_names_the_line_of_what_its_nodes_would_refuse(
    tmp_path: Path, section: str, field: str, message: str
) -> None:
    path = _write(tmp_path, BASE + section)
    load_scenario(path)  # the scenario's own schema has no objection: only the nodes would have
    line = find_line(path.read_text(), tuple(field.split(".")))
    assert line is not None
    with pytest.raises(ConfigError) as info:
        load_runnable_scenario(path)
    assert str(info.value).startswith(f"{path}:{line}: {field}: "), str(info.value)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert load_runnable_scenario(_write(tmp_path, BASE)).nodes == 4


COMPRESSED = BASE + """
[compression]
sparsifier = "randk"
ratio = 0.05
consensus_step = 0.4

[outer]
optimizer = "nesterov"

[links]
upload_mbit = 20.0
download_mbit = 40.0
overrides = [{ nodes = [2], upload_mbit = 1.0, download_mbit = 2.0 }]
"""


def test_compression_outer_and_per_node_links_reach_the_nodes(tmp_path: Path) -> None:
    sc = parse_scenario(COMPRESSED)
    loaded = [load_config(_dump(tmp_path, cfg)) for cfg in node_configs(sc, tmp_path, base_port=47000)]
    for i, cfg in enumerate(loaded):
        assert cfg.compression.sparsifier.value == "randk" and cfg.compression.ratio == 0.05
        assert cfg.compression.consensus_step == 0.4 and cfg.outer.optimizer.value == "nesterov"
        up, down = (1.0, 2.0) if i == 2 else (20.0, 40.0)
        assert cfg.link.upload_bytes_s == up * 1e6 / 8 and cfg.link.download_bytes_s == down * 1e6 / 8
        assert cfg.learning.checkpoint_every_rounds == 1  # testnets kill nodes: a crash loses one round at most
    assert not parse_scenario(BASE).links.limited


def test_link_overrides_name_real_nodes() -> None:
    with pytest.raises(ConfigError, match=r"links.overrides\[0\].nodes: node index 9 out of range"):
        parse_scenario(COMPRESSED.replace("nodes = [2]", "nodes = [9]"))


def test_unsound_compression_with_privacy_names_the_scenario_line(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + '[privacy]\nenabled = true\n\n[compression]\nsparsifier = "topk"\n')
    line = find_line(path.read_text(), ("compression", "sparsifier"))
    with pytest.raises(ConfigError) as info:
        load_runnable_scenario(path)
    assert str(info.value).startswith(f"{path}:{line}: compression.sparsifier: "), str(info.value)
    assert "reveals which ones moved" in str(info.value) and "\n" not in str(info.value)


def test_events_in_order_per_trigger_are_accepted() -> None:
    """Only a step back on one trigger is refused: rounds of different
    references, and round and time triggers, do not order each other."""
    sc = parse_scenario(BASE + textwrap.dedent("""
        [[churn]]
        at_round = 8
        round_of = "front"
        action = "heal"

        [[churn]]
        at_round = 3
        action = "heal"

        [[churn]]
        at_round = 3
        action = "heal"

        [[churn]]
        at_s = 1.0
        action = "heal"
    """))
    assert [ev.at_round for ev in sc.churn] == [8, 3, 3, None]


def test_topology_rotation_reaches_every_nodes_sampler(tmp_path: Path) -> None:
    """``[topology] rotation_shuffles`` is each node's network.neighbour_rotation_shuffles
    (0 by default: neighbours kept while alive); a negative one is refused at its line."""
    text = default_scenario_text().replace("[topology]\ndegree = 3", "[topology]\ndegree = 3\nrotation_shuffles = 4")
    sc = parse_scenario(text)
    assert sc.topology.rotation_shuffles == 4 and load_scenario(None).topology.rotation_shuffles == 0
    for i, cfg in enumerate(node_configs(sc, tmp_path, base_port=45000)):
        path = tmp_path / f"n{i}.toml"
        path.write_text(dump_toml(cfg))
        assert load_config(path).network.neighbour_rotation_shuffles == 4
    with pytest.raises(ConfigError, match="rotation_shuffles"):
        parse_scenario(text.replace("rotation_shuffles = 4", "rotation_shuffles = -1"))
