"""set-config's file side: the overlay of allowed keys over a base it never writes, validation
through config.py's loader, the TOML writer, the diff, refusals that write nothing, and a
tampered overlay refused whole."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edge_runtime.errors import ConfigError, RemoteConfigError
from edge_runtime.fleet.config_update import prepare_config, render_toml, write_config
from edge_runtime.fleet.remote_config import MAX_OVERLAY_BYTES, merged_config, read_overlay
from edge_runtime.tomlconfig import read_toml

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_render_reads_back_exactly() -> None:
    table = {"server": {"host": "0.0.0.0", "port": 8001, "api_key": 'q"uote\\\x7f\n'},
             "model": {"pubkeys": ["a.pub", "ü/b.pub"], "threads": 2},
             "offload": {"failure_rate": 0.25, "open_s": 1e-3},
             "odd key": {"x-y": True}}
    assert tomllib.loads(render_toml(table)) == table


def test_keys_merge_into_the_overlay_never_the_base(tmp_path: Path) -> None:
    base = tmp_path / "etc" / "edge.toml"
    base.parent.mkdir()
    base.write_text('[server]\nport = 8000\n[model]\npubkeys = ["k.pub"]\n')
    overlay = tmp_path / "state" / "remote.toml"
    u = prepare_config(overlay, base, keys={"scheduler": {"max_queue": 9}, "log.level": "debug"})
    assert u.path == overlay and not overlay.exists()  # nothing written yet
    assert u.changed == {"log.level": ["info", "debug"], "scheduler.max_queue": [None, 9]}
    write_config(u)
    assert tomllib.loads(overlay.read_text()) == {"scheduler": {"max_queue": 9},
                                                  "log": {"level": "debug"}}
    cfg = merged_config(read_toml(base), base.parent, str(base), overlay)[1]
    assert (cfg.server.port, cfg.log.level, cfg.scheduler.max_queue) == (8000, "debug", 9)
    assert cfg.model.pubkeys == (base.parent / "k.pub",)  # the base's paths, resolved there
    u = prepare_config(overlay, base, keys={"log.level": "warning"})  # merged, not replaced
    assert u.changed == {"log.level": ["debug", "warning"]}
    assert u.config.scheduler.max_queue == 9
    assert base.read_text().startswith("[server]\nport = 8000")


@pytest.mark.parametrize(("kw", "match"), [
    ({"keys": {"scheduler.max_batch": 0}}, "max_batch"),
    ({"keys": {"server.port": 8001}}, "may not change server.port"),
    ({"keys": {"server.nope": 1}}, "may not change server.nope"),
    ({"keys": {"port": 1}}, "must be 'section.key'"),
    ({"keys": {"a.b.c": 1}}, "must be 'section.key'"),
    ({"toml": "[scheduler]\nmax_queue = 'x'"}, "'scheduler.max_queue' must be int"),
    ({"toml": "port = 1"}, "may not change port"),
    ({"toml": "[fleet]\nremote_config = 'x.toml'"}, "may not change fleet.remote_config"),
    ({"toml": "#" * MAX_OVERLAY_BYTES}, "bytes, more than"),
    ({}, "exactly one"),
])
def test_refusals_write_nothing(tmp_path: Path, kw: dict[str, object], match: str) -> None:
    base, overlay = tmp_path / "edge.toml", tmp_path / "remote.toml"
    base.write_text("[server]\nport = 8000\n")
    overlay.write_text("[log]\nlevel = 'debug'\n")
    with pytest.raises(ConfigError, match=match):
        prepare_config(overlay, base, **kw)  # type: ignore[arg-type]
    assert base.read_text() == "[server]\nport = 8000\n"
    assert overlay.read_text() == "[log]\nlevel = 'debug'\n"


def test_a_tampered_overlay_is_refused_whole_and_only_a_document_replaces_it(
    tmp_path: Path,
) -> None:
    base, overlay = tmp_path / "edge.toml", tmp_path / "remote.toml"
    base.write_text('[fleet]\nbroker = "mqtts://fleet:8883"\n')
    overlay.write_text('[log]\nlevel = "debug"\n[fleet]\nbroker = "mqtt://evil:1883"\n')
    with pytest.raises(RemoteConfigError, match=r"sets fleet\.broker, which only provisioning"):
        read_overlay(overlay)
    with pytest.raises(ConfigError, match="send a whole document"):
        prepare_config(overlay, base, keys={"log.level": "warning"})
    u = prepare_config(overlay, base, toml='[log]\nlevel = "warning"\n')
    assert u.changed == {"log.level": ["info", "warning"]}  # from the base: what ran
    assert u.config.fleet.broker == "mqtts://fleet:8883"
    write_config(u)
    assert read_overlay(overlay) == {"log": {"level": "warning"}}
    # Values the loader refuses, a symlink, a huge file: refused whole too.
    for bad in ("[scheduler]\nmax_batch = 0\n", "not toml ["):
        overlay.write_text(bad)
        with pytest.raises(RemoteConfigError, match=r"remote\.toml"):
            merged_config(read_toml(base), tmp_path, str(base), overlay)
    overlay.unlink()
    overlay.symlink_to(base)
    with pytest.raises(RemoteConfigError, match="not a regular file"):
        read_overlay(overlay)
    overlay.unlink()
    overlay.write_text("#" * (MAX_OVERLAY_BYTES + 1))
    with pytest.raises(RemoteConfigError, match="bytes, more than"):
        read_overlay(overlay)
