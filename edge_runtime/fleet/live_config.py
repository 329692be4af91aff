"""What a fleet set-config changes in a running daemon, and what waits for a restart.

    plan = plan_config(running, file_config, flags, cloud_path=offload is not None)
    plan.running        # the Config the daemon runs once the live keys are applied
    plan.live           # keys applied now, e.g. ["scheduler.default_deadline_s"]
    plan.restart        # keys written to the file that take effect at the next start
    plan.overridden     # keys the file sets but a command-line flag of this daemon pins

The provisioned file with the overlay the agent writes merged over it (remote_config.py) is
what the daemon will load at its next start; on top of both the daemon's own command-line
flags still win (`Config.override`), so the config a restart would run is
`file_config.override(flags)`, and that is what is compared with the running one.

Applied live (LIVE_KEYS), because the code reads them at each use:

    scheduler.max_queue, default_deadline_s, safety, engine_error_limit, offload_enabled
                        read by the scheduler at every decision (LocalWorker.reconfigure);
                        offload_enabled = true is live only when the daemon started with a
                        cloud path ([offload] broker and offload on): else it has no client
    log.level           the root logger's level
    fleet.telemetry_interval_s
                        the agent's next telemetry wait (the current one runs out first)
    fleet.probe_*       the thresholds of the next deploy's probe

Everything else needs a restart: what is built once at start-up (the HTTP socket and its
auth, the model and its decode batches sized by scheduler.max_batch (or measured, with
step_latency_target_ms and memory_headroom_mb), the MQTT clients of the
offload path and of the agent, the access log file, the cloud p99 prior captured by the
scheduler's view of the cloud).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_runtime.config import Config
from edge_runtime.fleet.config_update import flatten_config

_PROBE_KEYS = ("min_greedy_match", "max_perplexity_increase", "max_ttft_ms",
               "min_tokens_per_s", "require_reference")
LIVE_KEYS: frozenset[str] = frozenset({
    "scheduler.max_queue", "scheduler.default_deadline_s", "scheduler.safety",
    "scheduler.engine_error_limit", "scheduler.offload_enabled",
    "log.level",
    "fleet.telemetry_interval_s",
    *(f"fleet.probe_{k}" for k in _PROBE_KEYS),
})


@dataclass(frozen=True)
class ConfigPlan:
    target: Config
    """What a restart would run: the new file with this daemon's flags on top."""
    running: Config
    """The running config with the live keys of `target` applied."""
    live: list[str]
    restart: list[str]
    overridden: list[str]

    def detail(self) -> dict[str, list[str]]:
        """For the set-config ack: which keys apply now, which at the next start."""
        return {"applied_live": self.live, "needs_restart": self.restart,
                "overridden_by_flags": self.overridden}


def plan_config(running: Config, file_config: Config, flags: Mapping[str, Any],
                cloud_path: bool) -> ConfigPlan:
    """Split the change from `running` to `file_config` (+ `flags`) into live and restart."""
    pinned = {k: v for k, v in flags.items() if v is not None}
    target = file_config.override(pinned)
    before, after, in_file = (flatten_config(c) for c in (running, target, file_config))
    changed = [k for k in sorted(after) if before[k] != after[k]]
    live = [k for k in changed if k in LIVE_KEYS
            and not (k == "scheduler.offload_enabled" and after[k] and not cloud_path)]
    restart = [k for k in changed if k not in live]
    default = flatten_config(Config())
    # Set in the file (to other than the default), yet pinned to another value by a flag.
    overridden = sorted(k for k in pinned if in_file[k] != after[k] and in_file[k] != default[k])
    sections: dict[str, dict[str, Any]] = {}
    for key in live:
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = getattr(getattr(target, section), name)
    now = dataclasses.replace(running, **{
        s: dataclasses.replace(getattr(running, s), **kv) for s, kv in sections.items()})
    return ConfigPlan(target, now, live, restart, overridden)
