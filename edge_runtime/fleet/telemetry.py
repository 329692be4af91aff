"""Host telemetry of a device: one reader over Jetson (tegrastats), NVIDIA GPU (NVML) and /proc.

    host = HostTelemetry()          # picks what this machine has
    host.sample()                   # -> the `system` object of fleet/{device}/telemetry
    host.close()

Sources: on a Jetson, a long-running `tegrastats --interval MS` whose latest line is parsed
(`parse_tegrastats`); with `pynvml` importable and a driver present, NVML for discrete GPUs;
/proc and /sys everywhere else (and for what tegrastats does not say: the load average).
No source needs a package beyond the base install.

`system` fields (fixed names; absent when the machine does not report them):

    source            "tegrastats", "proc" (+ "+nvml" when NVML answered)
    cpu_percent       busy share of all cores since the last sample, %
    cpu_cores         [{"load_percent": 14, "freq_mhz": 2188} | null (core off), ...]
    load1, load5, load15
    mem_used_mb, mem_total_mb, swap_used_mb, swap_total_mb
    gpu_percent       Jetson GR3D (iGPU) load, or the mean of NVML GPUs' utilisation, %
    gpu_freq_mhz      Jetson GR3D frequency (first GPC), MHz
    emc_percent       Jetson memory controller load, %
    temps_c           {"cpu": 52.6, "gpu": 50.1, "tj": 52.6, ...}: tegrastats names, or
                      /sys thermal zone types lower-cased; absent sensors (-256 C) dropped
    power_mw          {"VDD_GPU_SOC": 2412, "VDD_CPU_CV": 1607, "VIN_SYS_5V0": 4707, ...}
                      instantaneous rail power; `power_avg_mw` the tegrastats averages
    gpus              NVML: [{"index", "name", "util_percent", "mem_used_mb",
                      "mem_total_mb", "temp_c", "power_mw"}]

The `runtime` object next to it comes from the daemon's runtime_metrics hook; the names a
rollout gates on are RUNTIME_FIELDS.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUNTIME_FIELDS = {
    "error_rate": "share of requests that ended in a 5xx or engine error, last window "
                  "(a drained device's refusals are not errors)",
    "ttft_p95_ms": "95th percentile time to first token, ms, last window",
    "p95_latency_ms": "95th percentile latency of successful requests, ms, last window",
    "tokens_per_s": "decode tokens per second over the last window",
    "quality_drop": "quality probe score drop of the active bundle vs its build record",
    "queue_depth": "requests waiting in the scheduler now",
    "offload_share": "share of requests served by the cloud, last window",
}
"""The runtime metrics the daemon reports (its runtime_metrics hook) and rollouts read: each
key is always present, null where nothing was measured yet (no request in the window, no
deploy probed)."""

_ABSENT_C = -256.0  # what tegrastats prints for a sensor the module does not have
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?")
_CORE = re.compile(r"(\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+))?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW")


def parse_tegrastats(line: str) -> dict[str, Any]:
    """The fields of one tegrastats line (JetPack 5/6 formats); unknown parts are ignored."""
    out: dict[str, Any] = {}
    if m := _RAM.search(line):
        out["mem_used_mb"], out["mem_total_mb"] = int(m[1]), int(m[2])
    if m := _SWAP.search(line):
        out["swap_used_mb"], out["swap_total_mb"] = int(m[1]), int(m[2])
    if m := _CPU.search(line):
        cores = _cores(m[1], m[2])
        if cores:
            out["cpu_cores"] = cores
            on = [c["load_percent"] or 0 for c in cores if c is not None]
            # Cores that are off count as idle: the share is of the whole CPU.
            out["cpu_percent"] = round(sum(on) / len(cores), 1)
    if m := _GR3D.search(line):
        out["gpu_percent"] = int(m[1])
        if m[2] is not None:
            out["gpu_freq_mhz"] = int(m[2])
    if m := _EMC.search(line):
        out["emc_percent"] = int(m[1])
    temps = {name.lower(): float(v) for name, v in _TEMP.findall(line)
             if float(v) > _ABSENT_C}
    if temps:
        out["temps_c"] = temps
    rails = [(n, int(now), int(avg)) for n, now, avg in _RAIL.findall(line) if n != "NC"]
    if rails:
        out["power_mw"] = {n: now for n, now, _ in rails}
        out["power_avg_mw"] = {n: avg for n, _, avg in rails}
    return out


def _cores(body: str, shared_mhz: str | None) -> list[dict[str, int | None] | None]:
    """`14%@2188,off,...` (JetPack 4.4+) or `14%,off,...]@2188` (older, one frequency)."""
    cores: list[dict[str, int | None] | None] = []
    for raw in body.split(","):
        part = raw.strip()
        c = _CORE.fullmatch(part)
        if part == "off":
            cores.append(None)
        elif c is None:
            return []  # not a format we know: report no cores rather than wrong ones
        else:
            mhz = c[2] or shared_mhz
            cores.append({"load_percent": int(c[1]), "freq_mhz": int(mhz) if mhz else None})
    return cores


class _Tegrastats:
    """A `tegrastats --interval MS` child whose latest line a thread keeps."""

    def __init__(self, binary: str, interval_ms: int) -> None:
        self.latest: str | None = None
        self._proc = subprocess.Popen([binary, "--interval", str(interval_ms)],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True)
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip():
                self.latest = line.strip()
        log.warning("tegrastats exited with %s", self._proc.poll())

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)


class HostTelemetry:
    def __init__(
        self,
        tegrastats: str | None = "auto",
        interval_ms: int = 1000,
        nvml: bool = True,
        proc_root: Path = Path("/proc"),
        sys_root: Path = Path("/sys"),
    ) -> None:
        """`tegrastats`: "auto" (on PATH or /usr/bin), a path, or None for never."""
        self.proc_root, self.sys_root = proc_root, sys_root
        self._last_cpu: dict[str, tuple[int, int]] = {}
        self._tegra: _Tegrastats | None = None
        binary = shutil.which("tegrastats") if tegrastats == "auto" else tegrastats
        if binary:
            try:
                self._tegra = _Tegrastats(binary, interval_ms)
            except OSError as e:
                log.warning("cannot run %s: %s", binary, e)
        self._nvml: Any = _nvml() if nvml else None

    def sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": "proc"}
        out.update(self._proc_sample())
        line = self._tegra.latest if self._tegra is not None else None
        if line is not None:
            out["source"] = "tegrastats"
            out.update(parse_tegrastats(line))
        if self._nvml is not None:
            gpus = _nvml_sample(self._nvml)
            if gpus:
                out["source"] += "+nvml"
                out["gpus"] = gpus
                utils = [g["util_percent"] for g in gpus if g.get("util_percent") is not None]
                if utils and "gpu_percent" not in out:
                    out["gpu_percent"] = round(sum(utils) / len(utils), 1)
        return out

    def close(self) -> None:
        if self._tegra is not None:
            self._tegra.close()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as e:  # the driver went away: nothing left to release
                log.debug("nvmlShutdown: %s", e)

    # -- /proc and /sys -----------------------------------------------------------------

    def _proc_sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            load = (self.proc_root / "loadavg").read_text().split()
            out["load1"], out["load5"], out["load15"] = (float(x) for x in load[:3])
        except (OSError, ValueError, IndexError):
            pass
        m = meminfo(self.proc_root / "meminfo")
        if "MemTotal" in m:
            out["mem_total_mb"] = m["MemTotal"] >> 20
            out["mem_used_mb"] = (m["MemTotal"] - m.get("MemAvailable", 0)) >> 20
        if "SwapTotal" in m:
            out["swap_total_mb"] = m["SwapTotal"] >> 20
            out["swap_used_mb"] = (m["SwapTotal"] - m.get("SwapFree", 0)) >> 20
        total, cores = self._cpu_deltas()
        out["cpu_percent"] = total
        if cores:
            out["cpu_cores"] = [{"load_percent": pct, "freq_mhz": self._freq_mhz(i)}
                                for i, pct in enumerate(cores)]
        temps = self._thermal_zones()
        if temps:
            out["temps_c"] = temps
        return out

    def _cpu_deltas(self) -> tuple[float | None, list[float | None]]:
        """Busy % of all CPUs and of each core since the previous call (None the first time)."""
        try:
            lines = (self.proc_root / "stat").read_text().splitlines()
        except OSError:
            return None, []
        total: float | None = None
        cores: list[float | None] = []
        for line in lines:
            name, *rest = line.split()
            if not name.startswith("cpu"):
                break
            try:
                f = [int(x) for x in rest]
            except ValueError:
                continue
            idle, all_ = f[3] + (f[4] if len(f) > 4 else 0), sum(f[:8])
            last = self._last_cpu.get(name)
            self._last_cpu[name] = (idle, all_)
            pct = None
            if last is not None and all_ > last[1]:
                pct = round(100.0 * (1 - (idle - last[0]) / (all_ - last[1])), 1)
            if name == "cpu":
                total = pct
            else:
                cores.append(pct)
        return total, cores

    def _freq_mhz(self, core: int) -> int | None:
        p = self.sys_root / f"devices/system/cpu/cpu{core}/cpufreq/scaling_cur_freq"
        try:
            return int(p.read_text()) // 1000
        except (OSError, ValueError):
            return None

    def _thermal_zones(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for zone in sorted((self.sys_root / "class/thermal").glob("thermal_zone*")):
            try:
                name = (zone / "type").read_text().strip().lower()
                milli = int((zone / "temp").read_text())
            except (OSError, ValueError):
                continue
            if milli / 1000.0 > _ABSENT_C:
                # Jetson zone types end in "-thermal" (cpu-thermal); tegrastats says "cpu".
                out[name.removesuffix("-thermal")] = round(milli / 1000.0, 1)
        return out


def meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                out[key] = int(rest.split()[0]) * (1024 if rest.strip().endswith("kB") else 1)
    except (OSError, ValueError, IndexError):
        pass
    return out


def _nvml() -> Any:
    """The pynvml module, initialised, or None (not installed, no driver, no GPU)."""
    try:
        import pynvml  # optional: only on machines with a discrete NVIDIA GPU
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # pynvml raises NVMLError subclasses for "no driver" and the like
        log.info("NVML is not usable here: %s", e)
        return None
    return pynvml


def _nvml_sample(nv: Any) -> list[dict[str, Any]]:
    gpus: list[dict[str, Any]] = []
    try:
        count = nv.nvmlDeviceGetCount()
    except Exception as e:
        log.warning("NVML: %s", e)
        return gpus
    for i in range(count):
        g: dict[str, Any] = {"index": i}
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(i)
        except Exception as e:
            log.warning("NVML GPU %d: %s", i, e)
            continue
        reads = {
            "name": lambda h: _str(nv.nvmlDeviceGetName(h)),
            "util_percent": lambda h: nv.nvmlDeviceGetUtilizationRates(h).gpu,
            "mem_used_mb": lambda h: nv.nvmlDeviceGetMemoryInfo(h).used >> 20,
            "mem_total_mb": lambda h: nv.nvmlDeviceGetMemoryInfo(h).total >> 20,
            "temp_c": lambda h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
            "power_mw": nv.nvmlDeviceGetPowerUsage,
        }
        for key, read in reads.items():
            try:  # one unsupported query (power on some boards) must not hide the rest
                g[key] = read(handle)
            except Exception:
                g[key] = None
        gpus.append(g)
    return gpus


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
