"""Typed TOML config: defaults, documentation coverage, one-line errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from murmur.errors import ConfigError
from murmur.node.config import (
    AUTO,
    CONSTRAINTS,
    DEFAULT_NUM_NODES,
    Codec,
    LogFormat,
    OPEN_ENDED_PRIVACY_ROUNDS,
    NodeConfig,
    PrivacyScheme,
    AutoNATSection,
    RelaySection,
    TransportSection,
    auto_node_index,
    compression_advice,
    config_keys,
    config_to_dict,
    default_config_text,
    find_key_line,
    load_config,
    parse_override,
)
from murmur.protocol.circuit import Limit
from murmur.protocol.identity import Identity
from murmur.protocol.multiaddr import Multiaddr

DEFAULT_TOML = Path(__import__("murmur.node.config").node.config.__file__).with_name("default_node.toml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_default_file_loads_to_the_dataclass_defaults():
    assert load_config(DEFAULT_TOML) == NodeConfig()
    assert load_config(None) == NodeConfig()


def test_every_option_is_documented_in_default_file():
    text = default_config_text()
    lines = text.splitlines()
    for key in config_keys():
        lineno = find_key_line(text, key)
        assert lineno is not None, f"{key} missing from default_node.toml"
        above = lines[lineno - 2].strip()
        assert above.startswith("#"), f"{key} (line {lineno}) has no comment above it"


def test_constraint_table_names_only_real_fields():
    assert set(CONSTRAINTS) <= set(config_keys())


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"),
    [
        ("[transport]\nmax_frame = 12\n", 2, "transport.max_frame", "must be in [1024"),
        ("[transport]\n\n# c\nmax_frame = \"big\"\n", 4, "transport.max_frame", "must be an integer"),
        ("[transport]\nmax_fram = 4096\n", 2, "transport.max_fram", "unknown option"),
        ("[node]\nlog_level = 'info'\n[transprt]\nmax_frame = 1\n", 3, "transprt", "unknown option"),
        ("[relay]\nunlimited_peers = []\n", 2, "relay.unlimited_peers", "renamed: use relay.learning_peers"),
        ("[node]\nlog_format = 'xml'\n", 2, "node.log_format", "'json', 'text'"),
        ("[network]\nmdns = 1\n", 2, "network.mdns", "true or false"),
        ("[network]\nbootstrap = ['/ip4/10.0.0.1/tcp/1', '/ip4/10.0.0.1/udp/2/quic-v1']\n", 2, "network.bootstrap[1]",
         "multiaddr"),
        ("[network]\nbootstrap = ['/dns4/x/tcp/0']\n", 2, "network.bootstrap[0]", "port 0"),
        ("[network]\nbootstrap = ['/ip4/10.0.0.1/tcp/1/p2p-circuit']\n", 2, "network.bootstrap[0]", "relay"),
        ("[learning]\nquorum = 0.0\n", 2, "learning.quorum", "(0.0, 1.0]"),
        ("[learning]\nquorum = nan\n", 2, "learning.quorum", "nan"),
        ("[learning]\nstart_wait_s = -1.0\n", 2, "learning.start_wait_s", "finite number >= 0"),
        ("[learning]\nstart_wait_s = nan\n", 2, "learning.start_wait_s", "nan"),
        ("[learning]\ncheckpoint_every_s = inf\n", 2, "learning.checkpoint_every_s", "inf"),
        ("[api]\nhost = '0.0.0.0'\n", 2, "api.host", "loopback"),
        ("[privacy]\nscheme = 'magic'\n", 2, "privacy.scheme", "'decor'"),
        ("[privacy]\ndelta = 1.0\n", 2, "privacy.delta", "(0.0, 1.0)"),  # passed, then calibration raised
        ("[learning]\nseed = -1\n", 2, "learning.seed", "must be in [0, 4294967295]"),  # a traceback at start
        ("[node]\ndata_dir = ''\n", 2, "node.data_dir", "must not be empty"),  # was the current directory
        ("[learning]\nthreads = -1\n", 2, "learning.threads", "must be >= 0"),
        ("[learning]\ndevice = 'meta'\n", 2, "learning.device", "not one of auto, cpu, cuda, mps"),
        ("transport.max_frame = 10\n", 1, "transport.max_frame", "must be in [1024"),
        ("[network]\nneighbours = 30\nview_size = 20\n", 2, "network.neighbours", "view_size"),
        ("[learning]\nnum_nodes = 4\nnode_index = 4\n", 3, "learning.node_index", "num_nodes"),
        ("[learning]\nnode_index = 'first'\n", 2, "learning.node_index", "must be an integer or 'auto', got 'first'"),
        ("[learning]\nnode_index = -1\n", 2, "learning.node_index", "must be >= 0"),
        ("[learning]\nmode = 'gossip'\n[privacy]\nenabled = true\n", 4, "privacy.enabled", "dsgd"),
        ("[transport]\nping_interval_s = 90.0\n", 2, "transport.ping_interval_s", "idle_timeout_s"),
        ("[relay]\nlearning_peers = ['12D3KooWnope']\n", 2, "relay.learning_peers", "not an Ed25519 peer id"),
        ("[relay]\nlearning_circuit_data_bytes = 0\n", 2, "relay.learning_circuit_data_bytes", "must be in [1"),
        ("[relay]\ncircuit_duration_s = 0\n", 2, "relay.circuit_duration_s", "must be in [1"),
        ("[relay]\nservice = 'yes'\n", 2, "relay.service", "true or false"),
    ],
)
def test_bad_config_is_one_line_with_file_line_and_key(tmp_path, text, line, key, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert fragment in message


def test_invalid_toml_reports_position(tmp_path):
    path = write(tmp_path, "[node]\nlog_level = \n")
    with pytest.raises(ConfigError, match=r"node\.toml: invalid TOML: .*line 2"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_values_are_typed(tmp_path):
    peer = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
    path = write(
        tmp_path,
        f"""
[node]
data_dir = "state"
listen = ["/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0"]
log_format = "json"
[network]
bootstrap = ["/ip4/10.1.2.3/tcp/4731/p2p/{peer}"]
[transport]
idle_timeout_s = 30          # an int where a float is expected is fine
[learning]
codec = "int8"
[learning.trainer_options]
lr = 0.05
hidden = [64, 32]
[privacy]
enabled = true
scheme = "ldp"
""",
    )
    cfg = load_config(path)
    assert cfg.node.data_dir == (tmp_path / "state").resolve()  # relative to the file
    assert cfg.node.listen == (Multiaddr("127.0.0.1", 0), Multiaddr("::1", 0))
    assert cfg.node.log_format is LogFormat.JSON
    assert str(cfg.network.bootstrap[0].peer_id) == peer
    assert cfg.transport.idle_timeout_s == 30.0 and isinstance(cfg.transport.idle_timeout_s, float)
    assert cfg.learning.codec is Codec.INT8
    assert dict(cfg.learning.trainer_options) == {"lr": 0.05, "hidden": [64, 32]}
    assert cfg.privacy.scheme is PrivacyScheme.LDP and cfg.privacy.enabled
    with pytest.raises(TypeError):
        cfg.learning.trainer_options["lr"] = 1.0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.api.port = 1  # type: ignore[misc]


def test_overrides_win_over_file_and_are_validated(tmp_path):
    path = write(tmp_path, "[api]\nport = 8000\n[learning]\nrounds = 5\n")
    cfg = load_config(path, {"api.port": 0, "node.listen": ["/ip4/127.0.0.1/tcp/0"]})
    assert cfg.api.port == 0
    assert cfg.learning.rounds == 5  # untouched file value kept
    assert cfg.node.listen == (Multiaddr("127.0.0.1", 0),)
    with pytest.raises(ConfigError, match=r"^<command line>: api\.port: must be in \[0, 65535\], got 70000$"):
        load_config(path, {"api.port": 70000})
    with pytest.raises(ConfigError, match=r"^<command line>: api\.prot: unknown option"):
        load_config(None, {"api.prot": 1})
    with pytest.raises(ConfigError, match=r"^<command line>: network\.neighbours: must be <= network\.view_size"):
        load_config(None, {"network.neighbours": 99})


def test_parse_override_reads_toml_values():
    assert parse_override("learning.rounds=7") == ("learning.rounds", 7)
    assert parse_override("privacy.enabled=true") == ("privacy.enabled", True)
    assert parse_override("network.bootstrap=[]") == ("network.bootstrap", [])
    assert parse_override("learning.trainer=mnist-cnn") == ("learning.trainer", "mnist-cnn")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("learning.rounds")


def test_config_to_dict_roundtrips_through_overrides(tmp_path):
    cfg = load_config(None, {"learning.codec": "bf16", "network.bootstrap": ["/ip4/10.0.0.1/tcp/9"]})
    flat = config_to_dict(cfg)
    assert flat["learning"]["codec"] == "bf16"
    again = load_config(None, {f"{section}.{k}": v for section, table in flat.items() for k, v in table.items()})
    assert again == cfg


def test_transport_section_mirrors_transport_limits():
    transport = pytest.importorskip("murmur.protocol.transport")
    limits_fields = {f.name: f.default for f in dataclasses.fields(transport.TransportLimits)}
    ours = {f.name: f.default for f in dataclasses.fields(TransportSection)}
    # ciphers: the limits' default is machine-dependent (a factory); the config's () means "that default"
    assert ours.pop("ciphers") == () and "ciphers" in limits_fields
    limits_fields.pop("ciphers")
    assert ours == limits_fields
    assert TransportSection().limits() == transport.TransportLimits()


def test_transport_ciphers_from_config_reach_the_limits(tmp_path):
    noise = pytest.importorskip("murmur.protocol.noise")
    cfg = load_config(write(tmp_path, '[transport]\nciphers = ["chachapoly"]\n'))
    assert cfg.transport.limits().ciphers == (noise.NoiseCipher.CHACHAPOLY,)
    with pytest.raises(ConfigError, match="transport.ciphers"):
        load_config(write(tmp_path, '[transport]\nciphers = ["rot13"]\n'))


def test_error_lines_never_leak_python_reprs_of_types(tmp_path):
    path = write(tmp_path, "[node]\nlisten = '/ip4/127.0.0.1/tcp/0'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert re.search(r"node\.listen: must be a list, got str$", str(info.value))


def test_network_section_maps_onto_sampler_config():
    sampling = pytest.importorskip("murmur.protocol.sampling")
    cfg = load_config(None, {"network.view_size": 12, "network.subnet_bucket_size": 3, "network.allow_loopback": True,
                             "network.neighbour_rotation_shuffles": 5})
    sampler = cfg.network.sampler_config()
    assert isinstance(sampler, sampling.SamplerConfig)
    assert (sampler.view_size, sampler.max_per_subnet, sampler.allow_loopback_flood) == (12, 3, True)
    assert sampler.neighbour_rotation_rounds == 5  # counted in shuffles, as the sampler counts its rounds
    defaults = sampling.SamplerConfig()
    ours = NodeConfig().network
    assert (ours.view_size, ours.shuffle_length, ours.neighbours, ours.subnet_bucket_size,
            ours.neighbour_rotation_shuffles) == (defaults.view_size, defaults.shuffle_length, defaults.neighbours,
                                                  defaults.max_per_subnet, defaults.neighbour_rotation_rounds)
    with pytest.raises(ConfigError, match="neighbour_rotation_shuffles"):
        load_config(None, {"network.neighbour_rotation_shuffles": -1})


def test_learning_section_maps_onto_trainer_context_and_codec():
    base = pytest.importorskip("murmur.learning.trainers.base")
    codecs = pytest.importorskip("murmur.protocol.codecs")
    cfg = load_config(None, {"learning.attack": "backdoor", "learning.num_nodes": 8, "learning.node_index": 3,
                             "learning.trainer_options": {"lr": 0.1}, "learning.codec": "bf16"})
    ctx = cfg.learning.trainer_context()
    assert isinstance(ctx, base.TrainerContext)
    assert (ctx.node_index, ctx.num_nodes, ctx.attack, ctx.device, dict(ctx.options)) == (3, 8, "backdoor", None, {"lr": 0.1})
    with pytest.raises(ValueError, match="for_peer"):
        NodeConfig().learning.trainer_context()  # "auto" names no share until the peer id is known
    peer = Identity.generate().peer_id
    auto = NodeConfig().learning.for_peer(peer).trainer_context()
    assert auto.attack is None and 0 <= auto.node_index < auto.num_nodes == DEFAULT_NUM_NODES
    assert cfg.learning.codec.wire() is codecs.DeltaCodec.BF16
    assert {c.wire().name for c in Codec} == {c.name for c in codecs.DeltaCodec}


def test_learning_is_on_with_a_data_share_drawn_from_the_peer_id():
    """A node from the defaults learns, and needs nobody to hand it an index."""
    learning = NodeConfig().learning
    assert learning.enabled and learning.trainer == "digits-mlp"
    assert learning.node_index == AUTO and learning.num_nodes == DEFAULT_NUM_NODES
    peers = [Identity.generate().peer_id for _ in range(200)]
    shares = [auto_node_index(p, DEFAULT_NUM_NODES) for p in peers]
    assert shares == [auto_node_index(p, DEFAULT_NUM_NODES) for p in peers]  # stable: a restart keeps it
    assert set(shares) == set(range(DEFAULT_NUM_NODES))  # spread over every share
    assert learning.for_peer(peers[0]).node_index == shares[0]
    fixed = load_config(None, {"learning.node_index": 3, "learning.num_nodes": 4}).learning
    assert fixed.for_peer(peers[0]) is fixed  # an explicit index is the user's partition
    assert load_config(None, {"learning.node_index": "auto"}).learning.node_index == AUTO
    assert config_to_dict(NodeConfig())["learning"]["node_index"] == "auto"


# ---------------------------------------------------------------- compression x privacy


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        ({"compression.sparsifier": "topk"}, "compression.sparsifier", "reveals which ones moved"),
        ({"compression.sparsifier": "randk", "compression.mask": "sender"}, "compression.mask",
         "pairwise noise cancels only on coordinates both ends of an edge send"),
        ({"compression.sparsifier": "randk", "compression.mask": "sender", "privacy.scheme": "corn"},
         "compression.mask", "pairwise noise"),
    ],
    ids=["topk", "randk-sender-decor", "randk-sender-corn"],
)
def test_unsound_compression_with_privacy_is_one_config_error_naming_the_reason(
    overrides: dict[str, object], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"privacy.enabled": True, **overrides})
    message = str(caught.value)
    assert "\n" not in message and key in message and reason in message


@pytest.mark.parametrize(
    "overrides",
    [
        {"compression.sparsifier": "randk", "compression.mask": "network"},
        {"compression.sparsifier": "randk", "compression.mask": "sender", "privacy.scheme": "ldp"},
        {"compression.sparsifier": "randk", "compression.mask": "network", "privacy.level": "example"},
        {"learning.codec": "int2", "compression.rounding": "stochastic"},
        {"learning.codec": "int4", "privacy.scheme": "decor"},
    ],
    ids=["randk-network", "randk-sender-ldp", "randk-example", "int2", "int4-decor"],
)
def test_sound_compression_with_privacy_is_accepted(overrides: dict[str, object]) -> None:
    cfg = load_config(None, {"privacy.enabled": True, **overrides})
    assert cfg.privacy.enabled


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        ({"learning.codec": "int2"}, "falls to chance"),
        ({"compression.sparsifier": "randk", "compression.ratio": 0.01}, "then diverges"),
        ({"compression.sparsifier": "topk", "compression.ratio": 1.0}, "4-byte index"),
        ({"learning.codec": "int2", "compression.consensus_step": 0.1}, None),
        ({"compression.sparsifier": "randk", "compression.ratio": 0.01, "compression.consensus_step": 0.01}, None),
        ({"compression.sparsifier": "topk", "compression.ratio": 0.01}, None),
        ({"learning.codec": "int4"}, None),
    ],
    ids=["int2-step1", "randk-step1", "topk-ratio1", "int2-step0.1", "randk-step-ratio", "topk-0.01", "int4"],
)
def test_compression_that_defeats_itself_is_warned_of(overrides: dict[str, object], said: str | None) -> None:
    """Measured on real daemons: int2 with step 1 fell to chance by round 10,
    top-k at ratio 1 sent twice fp32's bytes; both ran without a word."""
    advice = compression_advice(load_config(None, overrides))
    assert (advice == []) if said is None else (len(advice) == 1 and said in advice[0]), advice


def test_privacy_noise_is_calibrated_for_the_rounds_the_node_trains() -> None:
    """A node that trains 100 rounds used to pay noise for 1000 (three times
    the noise a round): unless privacy.rounds names a horizon, it is the
    node's own rounds, and 1000 only for a node that trains until stopped."""
    assert load_config(None, {}).privacy.rounds == 0
    assert load_config(None, {}).privacy_rounds == 100  # learning.rounds' default
    assert load_config(None, {"learning.rounds": 40}).privacy_rounds == 40
    assert load_config(None, {"learning.rounds": 0}).privacy_rounds == OPEN_ENDED_PRIVACY_ROUNDS
    assert load_config(None, {"learning.rounds": 40, "privacy.rounds": 500}).privacy_rounds == 500
    with pytest.raises(ConfigError, match="privacy.rounds"):
        load_config(None, {"privacy.rounds": -1})


def test_top_k_without_privacy_is_fine_but_not_in_gossip_mode() -> None:
    assert load_config(None, {"compression.sparsifier": "topk"}).compression.compresses
    with pytest.raises(ConfigError, match="compression.sparsifier"):
        load_config(None, {"compression.sparsifier": "topk", "learning.mode": "gossip"})


def test_relay_section_becomes_the_relay_config(tmp_path):
    peer = Identity.generate().peer_id
    path = write(tmp_path, f"[relay]\nservice = true\ncircuit_data_bytes = 4096\nlearning_peers = ['{peer}']\n"
                           "learning_circuit_duration_s = 600\n")
    cfg = load_config(path)
    assert cfg.relay.service is True
    relay = cfg.relay.relay_config()
    assert relay.circuit_data_bytes == 4096 and relay.learning_peers == frozenset({peer})
    assert relay.learning_limit() == Limit(600, 1 << 30) and relay.stranger_limit() == Limit(120, 4096)
    assert relay.circuit_duration_s == 120  # go-libp2p's default for strangers


def test_relay_section_defaults_match_the_relay_config():
    from murmur.protocol.libp2p.relay import RelayConfig

    assert NodeConfig().relay.relay_config() == RelayConfig()
    assert NodeConfig().relay.service is False


def test_every_relay_autonat_and_stream_open_bound_is_an_option():
    """The relay's per-pair circuit limits, AutoNAT's pay deadline and the
    muxers' stream-open rate were constants the config could not reach: an
    operator who raised ``relay.max_circuits_per_peer`` to 64 still got 4
    circuits per pair and 8 per source IP, and ``--set
    relay.max_circuits_per_pair=8`` was an unknown option (exit 2)."""
    from murmur.protocol.libp2p.autonat import AutoNATConfig
    from murmur.protocol.libp2p.relay import RelayConfig

    assert {f.name for f in dataclasses.fields(RelayConfig)} <= {f.name for f in dataclasses.fields(RelaySection)}
    assert {f.name for f in dataclasses.fields(AutoNATConfig)} <= {f.name for f in dataclasses.fields(AutoNATSection)}
    assert NodeConfig().autonat.autonat_config() == AutoNATConfig()

    raised = load_config(None, {"relay.max_circuits_per_peer": 64}).relay.relay_config()
    assert (raised.max_circuits_per_pair, raised.ip_pair_limit()) == (4, 32)  # the IP's share follows per-peer
    assert NodeConfig().relay.relay_config().ip_pair_limit() == 8  # the default as it was
    cfg = load_config(None, {"relay.max_circuits_per_pair": 8, "relay.max_circuits_per_ip_pair": 12,
                             "transport.max_open_burst": 512, "transport.open_refill_s": 0.001,
                             "autonat.pay_timeout_s": 12.5, "autonat.max_paying": 4})
    relay = cfg.relay.relay_config()
    assert (relay.max_circuits_per_pair, relay.ip_pair_limit()) == (8, 12)
    mux = cfg.transport.limits().yamux()
    assert (mux.max_open_burst, mux.open_refill_s) == (512, 0.001)
    autonat = cfg.autonat.autonat_config()
    assert (autonat.pay_timeout_s, autonat.max_paying) == (12.5, 4)
    for bad in ({"relay.max_circuits_per_ip_pair": 0}, {"relay.max_circuits_per_ip_pair": "some"},
                {"transport.open_refill_s": 0}, {"autonat.max_paying": 0}):
        with pytest.raises(ConfigError):
            load_config(None, bad)
