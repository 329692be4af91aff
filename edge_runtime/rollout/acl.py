"""The broker ACL of deploy/mosquitto/: one `user` block per identity, generated here.

    device_acl("dev-1", ["lab", "eu"])   what device dev-1 may read and write
    operator_acl("operator-alice")       commands out; status, telemetry, acks in
    worker_acl("worker-gpu1")            offload requests in ($share only); answers out

The broker (mosquitto.conf there) makes a client certificate's CN the username, so these
blocks bind rights to identities the CA vouched for; password users get the same blocks by
name. A device's block names its own topics and its groups' command topics one by one:
Mosquitto's `pattern` lines apply to every user alike and cannot say "the groups of %u",
so provisioning (#12) appends one block per device it enrols, and removes it on retirement.
Mosquitto reads the file at start and on SIGHUP.
"""

from __future__ import annotations

from collections.abc import Iterable

from edge_runtime.errors import ConfigError, MessageError
from edge_runtime.mqtt import topics

ROLE_PREFIXES = ("operator-", "worker-")
"""Identity prefixes of the non-device roles; no device id may start with one (a device
certificate must never be mistaken for an operator's)."""


def _user(name: str) -> str:
    try:
        topics.check_id(name, "identity")
    except MessageError as e:
        raise ConfigError(str(e)) from None
    if any(c.isspace() for c in name):
        raise ConfigError(f"identity {name!r} contains whitespace (the ACL file splits on it)")
    return f"user {name}"


def device_acl(device_id: str, groups: Iterable[str] = ()) -> str:
    """A device's block: it reads its own commands and its groups' commands, and its own
    offload answers; it writes its status (and Will), telemetry, acks and offload requests.
    It cannot write its own command topic, nor touch another device's topics."""
    try:
        d = topics.check_device(device_id)
        cmds = [topics.fleet_group_cmd(g) for g in sorted(set(groups))]
    except MessageError as e:
        raise ConfigError(str(e)) from None
    if d.startswith(ROLE_PREFIXES):
        raise ConfigError(f"device id {d!r} starts with a role prefix {ROLE_PREFIXES}")
    lines = [
        f"# device {d}",
        _user(d),
        f"topic read {topics.fleet_cmd(d)}",
        *(f"topic read {c}" for c in cmds),
        f"topic write {topics.fleet_status(d)}",
        f"topic write {topics.fleet_telemetry(d)}",
        f"topic write {topics.fleet_cmd_ack(d)}",
        f"topic write {topics.offload_request(d)}",
        f"topic read edge/{d}/offload/res/+",
    ]
    return "\n".join(lines) + "\n"


def operator_acl(name: str) -> str:
    """An operator (`edge-fleet`, the rollout driver): sends commands to devices and groups,
    reads every device's status, telemetry and acks; no offload traffic."""
    if not name.startswith("operator-"):
        raise ConfigError(f"operator identity {name!r} must start with 'operator-'")
    return "\n".join([
        f"# operator {name}",
        _user(name),
        "topic write fleet/+/cmd",
        "topic write fleet/group/+/cmd",
        f"topic read {topics.FLEET_STATUS_ALL}",
        "topic read fleet/+/telemetry",
        "topic read fleet/+/cmd/ack",
    ]) + "\n"


def worker_acl(name: str) -> str:
    """A cloud worker: receives offload requests and writes answers on response topics; no
    fleet topic at all. The worker code itself answers only on the requesting device's own
    response topic (topics.check_response_topic): the broker cannot tie the two together."""
    if not name.startswith("worker-"):
        raise ConfigError(f"worker identity {name!r} must start with 'worker-'")
    return "\n".join([
        f"# cloud worker {name}",
        _user(name),
        f"topic read {topics.OFFLOAD_REQUEST_FILTER}",
        "topic write edge/+/offload/res/+",
    ]) + "\n"
