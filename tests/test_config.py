from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.config import Config, ServerConfig, load_config
from edge_runtime.errors import ConfigError

FULL = """
[server]
host = "0.0.0.0"
port = 9000
api_key_file = "secrets/key"
max_body_bytes = 2048

[model]
bundle = "bundles/demo"
pubkeys = ["keys/a.pub", "/etc/edge/b.pub"]
threads = 2

[scheduler]
max_batch = 2
max_queue = 4
default_deadline_s = 5
offload_enabled = false

[log]
access_log = ""
level = "debug"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "edge.toml"
    p.write_text(text)
    return p


def test_defaults_bind_loopback_without_auth() -> None:
    cfg = Config()
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000
    assert cfg.server.is_loopback and cfg.server.resolved_api_key() is None
    assert cfg.server.max_body_bytes == 1 << 20
    assert cfg.model.bundle is None and cfg.model.pubkeys == ()


def test_full_file_with_paths_relative_to_it(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.server == ServerConfig(
        host="0.0.0.0", port=9000, api_key_file=tmp_path / "secrets/key", max_body_bytes=2048
    )
    assert not cfg.server.is_loopback
    assert cfg.model.bundle == tmp_path / "bundles/demo"
    assert cfg.model.pubkeys == (tmp_path / "keys/a.pub", Path("/etc/edge/b.pub"))
    assert cfg.model.threads == 2
    sc = cfg.scheduler
    assert sc.default_deadline_s == 5.0 and isinstance(sc.default_deadline_s, float)
    assert (sc.max_batch, sc.max_queue, sc.offload_enabled) == (2, 4, False)
    assert cfg.log.access_log == "" and cfg.log.level == "debug"


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_max_batch_is_measured_unless_set(tmp_path: Path) -> None:
    sc = Config().scheduler
    # Unset: chosen at start-up from the measured step times and memory (serving/capacity.py).
    assert (sc.max_batch, sc.max_queue) == (None, None)
    assert (sc.step_latency_target_ms, sc.memory_headroom_mb) == (100.0, 1024)
    sc = load_config(write(tmp_path, "[scheduler]\nstep_latency_target_ms = 40\n"
                                     "memory_headroom_mb = 512\n")).scheduler
    assert sc.step_latency_target_ms == 40.0 and isinstance(sc.step_latency_target_ms, float)
    assert sc.memory_headroom_mb == 512 and sc.max_batch is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server]\nhots = 'x'\n", "unknown key 'server.hots'"),
        ("[srever]\n", "unknown section 'srever'"),
        ("[server]\nport = '80'\n", "'server.port' must be int"),
        ("[server]\nport = true\n", "'server.port' must be int"),
        ("[server]\nport = 70000\n", "server.port must be in [0, 65535]"),
        ("[model]\npubkeys = 'a.pub'\n", "'model.pubkeys' must be a list"),
        ("[model]\nthreads = 0\n", "model.threads must be >= 1"),
        ("[model]\nbackend = 'tensorrtt'\n", "model.backend must be one of"),
        ("[scheduler]\nmax_batch = 0\n", "scheduler.max_batch must be >= 1"),
        ("[scheduler]\nprefill_chunk = -1\n", "scheduler.prefill_chunk must be >= 0 (0: off)"),
        ("[scheduler]\nstep_latency_target_ms = 0\n",
         "scheduler.step_latency_target_ms must be > 0, got 0"),
        ("[scheduler]\nstep_latency_target_ms = 'fast'\n",
         "'scheduler.step_latency_target_ms' must be"),
        ("[scheduler]\nmemory_headroom_mb = -1\n",
         "scheduler.memory_headroom_mb must be >= 0, got -1"),
        ("[scheduler]\nprefix_cache_bytes = -1\n",
         "scheduler.prefix_cache_bytes must be >= 0 (0: off)"),
        ("[log]\nlevel = 'loud'\n", "log.level must be one of"),
        ("server = 3\n", "[server] must be a table"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert needle in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


def test_overrides_win_and_none_is_skipped(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL)).override(
        {"server.port": 8123, "server.host": None, "model.threads": 4}
    )
    assert cfg.server.port == 8123 and cfg.server.host == "0.0.0.0"
    assert cfg.model.threads == 4 and cfg.scheduler.max_queue == 4
    with pytest.raises(ConfigError, match=r"server\.port must be in"):
        cfg.override({"server.port": -1})
    with pytest.raises(ConfigError, match=r"unknown config key 'server\.nope'"):
        cfg.override({"server.nope": 1})


def test_api_key_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("tok-123\nignored\n")
    assert ServerConfig(api_key_file=tmp_path / "key").resolved_api_key() == "tok-123"
    assert ServerConfig(api_key="a", api_key_file=tmp_path / "key").resolved_api_key() == "a"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        ServerConfig(api_key_file=tmp_path / "empty").resolved_api_key()
    with pytest.raises(ConfigError, match="cannot read"):
        ServerConfig(api_key_file=tmp_path / "missing").resolved_api_key()
    with pytest.raises(ConfigError, match="must not be empty"):
        ServerConfig(api_key=" ")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.5", False),
        ("device.local", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert ServerConfig(host=host).is_loopback is loopback


FLEET = """
[fleet]
enabled = true
broker = "mqtts://broker.example:8883"
device_id = "orin-7"
root = "device"
groups = ["lab", "eu"]
pubkeys = ["keys/fleet.pub"]
ca_file = "tls/ca.pem"
cert_file = "tls/orin-7.pem"
key_file = "tls/orin-7.key"
telemetry_interval_s = 10
probe_min_greedy_match = 0.9
probe_max_ttft_ms = 800
"""


def test_fleet_section(tmp_path: Path) -> None:
    from edge_runtime.fleet.daemon import agent_config

    cfg = load_config(write(tmp_path, FLEET))
    f = cfg.fleet
    assert f.enabled and f.root == tmp_path / "device" and f.groups == ("lab", "eu")
    assert f.pubkeys == (tmp_path / "keys/fleet.pub",)
    limits = f.thresholds()
    assert (limits.min_greedy_match, limits.max_ttft_ms) == (0.9, 800)
    assert limits.max_perplexity_increase == 0.05  # unset keys keep their defaults
    agent = agent_config(cfg)
    assert (agent.device, agent.root, agent.groups) == ("orin-7", tmp_path / "device",
                                                        ("lab", "eu"))
    assert agent.tls is not None and agent.tls.cert_file == str(tmp_path / "tls/orin-7.pem")
    assert agent.telemetry_interval_s == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[fleet]\nenabled = true\nroot = 'd'\n", "needs fleet.broker and fleet.root"),
        ("[fleet]\nprobe_min_greedy_match = 1.5\n", "min_greedy_match must be in [0, 1]"),
        ("[fleet]\ntelemetry_interval_s = 0\n", "telemetry_interval_s must be > 0"),
        ("[fleet]\nprobe_max_ttft = 1\n", "unknown key 'fleet.probe_max_ttft'"),
    ],
)
def test_bad_fleet_section(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text))
