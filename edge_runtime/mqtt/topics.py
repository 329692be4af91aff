"""Every MQTT topic name of the project, in one place.

    edge/{device}/offload/req               a device's offload requests
    $share/{group}/edge/+/offload/req       what cloud workers subscribe to (one gets each)
    edge/{device}/offload/res/{session}     answers to one daemon session of one device
    fleet/{device}/status                   retained online/offline status (Will = offline)
    fleet/{device}/telemetry                periodic metrics
    fleet/{device}/cmd                      commands to one device
    fleet/{device}/cmd/ack                  the device's acks of those commands
    fleet/group/{group}/cmd                 commands to a device group

The device id is always the second level, so a broker ACL can confine a device to
`edge/{device}/#` and `fleet/{device}/#` (Mosquitto's `pattern readwrite edge/%c/#`).
Ids are single topic levels: `/` would shift the levels, `+` and `#` are wildcards.
"""

from __future__ import annotations

from edge_runtime.errors import MessageError

_FORBIDDEN = frozenset("/+#\0")


def check_id(value: str, what: str = "id") -> str:
    """`value` if it can be one topic level, else MessageError naming `what`."""
    if not isinstance(value, str) or not value:
        raise MessageError(f"{what} must be a non-empty string, got {value!r}")
    bad = sorted(_FORBIDDEN.intersection(value))
    if bad:
        raise MessageError(f"{what} {value!r} contains {bad!r}; '/', '+', '#' are not allowed")
    if value.startswith("$"):
        # Brokers reserve topics that start with '$' ($SYS, $share): no id may start one.
        raise MessageError(f"{what} {value!r} must not start with '$'")
    return value


def check_device(device: str) -> str:
    """A device id; `group` is reserved, as `fleet/group/...` holds group commands."""
    check_id(device, "device id")
    if device == "group":
        raise MessageError("device id 'group' is reserved (fleet/group/{group}/cmd)")
    return device


def offload_request(device: str) -> str:
    return f"edge/{check_device(device)}/offload/req"


def offload_request_shared(group: str) -> str:
    """The shared subscription of cloud workers: the broker hands each request to one."""
    return f"$share/{check_id(group, 'group')}/edge/+/offload/req"


OFFLOAD_REQUEST_FILTER = "edge/+/offload/req"
"""The filter inside `offload_request_shared`, for matching received topics."""


def offload_response(device: str, session: str) -> str:
    return f"edge/{check_device(device)}/offload/res/{check_id(session, 'session')}"


def device_of(topic: str) -> str:
    """The device id of an `edge/{device}/...` or `fleet/{device}/...` topic."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] not in ("edge", "fleet") or parts[1] == "group":
        raise MessageError(f"topic {topic!r} names no device")
    return check_device(parts[1])


def fleet_status(device: str) -> str:
    return f"fleet/{check_device(device)}/status"


FLEET_STATUS_ALL = "fleet/+/status"
"""Every device's retained status: what an operator reads to list the fleet."""


def fleet_telemetry(device: str) -> str:
    return f"fleet/{check_device(device)}/telemetry"


def fleet_cmd(device: str) -> str:
    return f"fleet/{check_device(device)}/cmd"


def fleet_cmd_ack(device: str) -> str:
    return f"fleet/{check_device(device)}/cmd/ack"


def fleet_group_cmd(group: str) -> str:
    return f"fleet/group/{check_id(group, 'group')}/cmd"
