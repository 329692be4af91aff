"""The device side of fleet management: the agent, deployments, bundle slots, telemetry.

    agent.py          DeviceAgent: status, telemetry, commands with acks over MQTT
    agent_process.py  the agent as a process of its own
    daemon.py         the agent inside the daemon (`edge-runtime serve --fleet`)
    deploy.py         download → verify → stage → swap → health-check → commit / roll back
    download.py       resumable, bounded download of a bundle archive
    slots.py          on-disk bundle slots, crash-safe switching
    journal.py        the command journal (exactly-once handling, replay nonces)
    command_auth.py   operator-signed commands: signing, verification, targets, expiry
    audit.py          the append-only audit log (device and operator side)
    config_update.py  set-config: validate, write the remote-config overlay atomically, diff
    remote_config.py  the overlay of remotely set keys, merged over the provisioned config
    live_config.py    what a set-config changes in a running daemon
    telemetry.py      host telemetry: tegrastats, NVML, /proc
    messages.py       the fleet wire format: commands, acks, status, telemetry

May import: serving, model, engines, bundle, mqtt, api (metrics only, from daemon.py),
config, tomlconfig (remote_config.py reads its overlay as config.py reads the file), signing,
pki (daemon.py checks the device's own certificate at start, as the doctor does), atomic,
errors.
"""
