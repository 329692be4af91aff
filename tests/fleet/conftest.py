"""The device agent's fixtures: a controller, a device root, bundle v2 (agent_fixtures.py)."""

from agent_fixtures import (  # noqa: F401
    bundle_v2,
    bundle_v2_tar,
    controller,
    device_root,
)
