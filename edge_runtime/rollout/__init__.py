"""The operator's side of the fleet: `edge-fleet` and staged rollouts.

    cli.py          edge-fleet: devices, telemetry, rollouts
    commands.py     edge-fleet drain / undrain / set-config / rollback --device, audit
    controller.py   the staged-rollout controller (pure state machine)
    plan.py         a rollout's records and which device goes in which phase
    driver.py       the I/O around the controller: MQTT, SQLite, the clock
    store.py        rollout state in SQLite (survives a killed controller)
    abort_rules.py  the `--abort-if` expression (a small parser, no eval)
    acl.py          the broker ACL blocks of devices, operators, workers (deploy/mosquitto)
    provision.py    edge-fleet provision: device keys, certificates (pki), config.toml
    revoke.py       edge-fleet revoke: device certificates onto the fleet CA's CRL
    image.py        edge-fleet image: a device's rootfs overlay for L4T flashing, checked

May import: fleet.messages (the wire format it shares with devices), fleet.slots (a .tar is
unpacked and verified the way a device does it), fleet.command_auth (commands are signed
the way devices check them), fleet.audit (one audit-log format on both sides),
fleet.config_update (which keys are secret, for redaction), fleet.remote_config (where a
device keeps remotely set keys: provisioning names it, the image checks the unit lets the
daemon write there), bundle, mqtt, signing, config,
pki (the fleet CA and device certificates), atomic, errors. Runs on an operator's machine,
never on a device.
"""
