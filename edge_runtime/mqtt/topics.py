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


def check_response_topic(request_topic: str, response_topic: str) -> str:
    """`response_topic` if it is `edge/{device}/offload/res/{session}` for the device named
    in `request_topic` (`edge/{device}/offload/req`), else MessageError saying why.

    A request's ResponseTopic is chosen by whoever published it: unchecked, a cloud worker
    would publish its answer wherever a request says (`fleet/victim/cmd`, another device's
    responses) with the worker's broader broker rights. The request topic's device level is
    what the broker's ACL checked against the publisher's identity; the answer may go only
    back to that device."""
    req = request_topic.split("/")
    if len(req) != 4 or req[0] != "edge" or req[2:] != ["offload", "req"]:
        raise MessageError(f"request topic {request_topic!r} is not edge/{{device}}/offload/req")
    device = check_device(req[1])
    res = response_topic.split("/")
    if len(res) != 5 or res[0] != "edge" or res[2:4] != ["offload", "res"]:
        raise MessageError(f"response topic {response_topic!r} is not "
                           f"edge/{device}/offload/res/{{session}}")
    if res[1] != device:
        raise MessageError(f"response topic {response_topic!r} belongs to device {res[1]!r}, "
                           f"not to {device!r} who sent the request")
    check_id(res[4], "session")
    return response_topic


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
