"""The ACL blocks provisioning writes (rollout/acl.py); the broker enforcing them is tested
in tests/mqtt/test_shipped_broker.py."""

from __future__ import annotations

import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.rollout.acl import device_acl, operator_acl, worker_acl


def test_device_block_names_its_own_topics_and_groups_only() -> None:
    lines = device_acl("dev-a", ["prod", "lab", "lab"]).splitlines()
    assert lines[1] == "user dev-a"
    assert set(lines[2:]) == {
        "topic read fleet/dev-a/cmd",
        "topic read fleet/group/lab/cmd",
        "topic read fleet/group/prod/cmd",
        "topic write fleet/dev-a/status",
        "topic write fleet/dev-a/telemetry",
        "topic write fleet/dev-a/cmd/ack",
        "topic write edge/dev-a/offload/req",
        "topic read edge/dev-a/offload/res/+",
    }
    assert not any(line.startswith("topic readwrite") for line in lines)


@pytest.mark.parametrize("device, groups", [
    ("dev/a", []), ("dev+", []), ("#", []), ("$SYS", []), ("group", []), ("", []),
    ("dev a", []), ("operator-x", []), ("worker-x", []), ("dev-a", ["g/h"]), ("dev-a", ["+"]),
])
def test_ids_that_would_widen_the_acl_are_refused(device: str, groups: list[str]) -> None:
    with pytest.raises(ConfigError):
        device_acl(device, groups)


def test_role_blocks_need_their_prefix() -> None:
    assert "user operator-alice" in operator_acl("operator-alice")
    assert "topic write fleet/+/cmd" in operator_acl("operator-alice")
    assert "topic write edge/+/offload/res/+" in worker_acl("worker-gpu")
    assert "fleet" not in worker_acl("worker-gpu").replace("# cloud worker", "")
    for bad in (lambda: operator_acl("alice"), lambda: worker_acl("dev-a")):
        with pytest.raises(ConfigError):
            bad()
