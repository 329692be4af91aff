"""Host telemetry: the tegrastats parser on real JetPack output, /proc and /sys, the reader.

The sample lines are tegrastats output as published for these boards (the format of
NVIDIA's Jetson Linux developer guide, "tegrastats Utility"): an AGX Orin 64 GB on L4T
R36.4.4 (JetPack 6.2), an AGX Orin with absent sensors (-256C) and unconnected rails (NC),
and an Orin Nano on JetPack 6 (one VDD_IN rail, GR3D with its frequency).
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from edge_runtime.fleet.telemetry import HostTelemetry, parse_tegrastats

AGX_ORIN_JP62 = (
    "05-09-2026 18:42:06 RAM 18207/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) "
    "CPU [14%@2188,5%@2112,8%@2035,14%@2201,46%@1267,47%@1267,2%@1267,10%@1267,4%@1036,"
    "5%@1036,6%@1036,10%@1036] EMC_FREQ 3%@2133 GR3D_FREQ 0%@[0,0] NVENC 79%@166 NVDEC off "
    "NVJPG off NVJPG1 off VIC 36%@115 OFA off NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 "
    "cpu@52.562C soc2@48.437C soc0@49.093C tj@52.562C soc1@49.656C VDD_GPU_SOC 2412mW/2412mW "
    "VDD_CPU_CV 1607mW/1607mW VIN_SYS_5V0 4707mW/4707mW"
)
AGX_ORIN_ABSENT = (
    "04-11-2025 10:36:27 RAM 4321/62801MB (lfb 1759x4MB) SWAP 19/31400MB (cached 0MB) "
    "CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,off,off,off,off] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 61%@[816,816] VIC_FREQ 729 APE 174 CV0@-256C CPU@44.562C "
    "Tboard@32C SOC2@40.093C Tdiode@33C SOC0@41.093C CV1@-256C GPU@47.5C tj@44.343C "
    "SOC1@41.25C CV2@-256C VDD_GPU_SOC 9340mW/5120mW VDD_CPU_CV 390mW/390mW "
    "VIN_SYS_5V0 4025mW/4025mW NC 0mW/0mW VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW"
)
ORIN_NANO_JP6 = (
    "10-08-2026 04:35:02 RAM 6712/7620MB (lfb 12x4MB) SWAP 369/3810MB (cached 8MB) "
    "CPU [38%@1497,2%@729,1%@729,0%@729,1%@729,0%@729] EMC_FREQ 61%@2133 GR3D_FREQ 99%@[612] "
    "NVDEC off NVJPG off VIC off OFA off APE 200 cpu@57.125C soc2@55.093C soc0@56.625C "
    "gpu@58.5C tj@58.5C soc1@56.2C VDD_IN 12800mW/8535mW VDD_CPU_GPU_CV 6500mW/1944mW "
    "VDD_SOC 2720mW/3659mW"
)


def test_agx_orin_jetpack_6_line() -> None:
    t = parse_tegrastats(AGX_ORIN_JP62)
    assert (t["mem_used_mb"], t["mem_total_mb"]) == (18207, 62841)
    assert (t["swap_used_mb"], t["swap_total_mb"]) == (86, 31420)
    assert len(t["cpu_cores"]) == 12
    assert t["cpu_cores"][0] == {"load_percent": 14, "freq_mhz": 2188}
    assert t["cpu_cores"][11] == {"load_percent": 10, "freq_mhz": 1036}
    assert t["cpu_percent"] == round(171 / 12, 1)
    assert (t["gpu_percent"], t["gpu_freq_mhz"], t["emc_percent"]) == (0, 0, 3)
    assert t["temps_c"] == {"cpu": 52.562, "soc2": 48.437, "soc0": 49.093, "tj": 52.562,
                            "soc1": 49.656}
    assert t["power_mw"] == {"VDD_GPU_SOC": 2412, "VDD_CPU_CV": 1607, "VIN_SYS_5V0": 4707}


def test_absent_sensors_off_cores_and_unconnected_rails() -> None:
    t = parse_tegrastats(AGX_ORIN_ABSENT)
    assert t["cpu_cores"][8:] == [None] * 4  # "off": powered down
    assert t["cpu_percent"] == 0.0
    assert (t["gpu_percent"], t["gpu_freq_mhz"]) == (61, 816)
    assert "cv0" not in t["temps_c"] and t["temps_c"]["gpu"] == 47.5
    assert t["temps_c"]["tj"] == 44.343 and t["temps_c"]["tboard"] == 32.0
    assert t["power_mw"] == {"VDD_GPU_SOC": 9340, "VDD_CPU_CV": 390, "VIN_SYS_5V0": 4025,
                             "VDDQ_VDD2_1V8AO": 301}
    assert t["power_avg_mw"]["VDD_GPU_SOC"] == 5120


def test_orin_nano_line_and_garbage() -> None:
    t = parse_tegrastats(ORIN_NANO_JP6)
    assert (t["gpu_percent"], t["gpu_freq_mhz"]) == (99, 612)
    assert t["power_mw"]["VDD_IN"] == 12800 and t["temps_c"]["gpu"] == 58.5
    assert parse_tegrastats("") == {}
    assert parse_tegrastats("RAM lots CPU [x] GR3D_FREQ ?") == {}


def _fake_proc(root: Path, stat_lines: list[str]) -> None:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/loadavg").write_text("0.50 0.40 0.30 1/100 999\n")
    (root / "proc/meminfo").write_text(
        "MemTotal:       8000000 kB\nMemAvailable:   6000000 kB\n"
        "SwapTotal:      1024000 kB\nSwapFree:        512000 kB\n")
    (root / "proc/stat").write_text("\n".join(stat_lines) + "\nintr 1 2 3\n")


def test_proc_and_sys_sources(tmp_path: Path) -> None:
    zone = tmp_path / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("CPU-therm\n")
    (zone / "temp").write_text("45500\n")
    absent = tmp_path / "sys/class/thermal/thermal_zone1"
    absent.mkdir()
    (absent / "type").write_text("cv0-thermal\n")
    (absent / "temp").write_text("-256000\n")
    freq = tmp_path / "sys/devices/system/cpu/cpu1/cpufreq"
    freq.mkdir(parents=True)
    (freq / "scaling_cur_freq").write_text("1497600\n")
    _fake_proc(tmp_path, ["cpu  100 0 100 800 0 0 0 0 0 0",
                          "cpu0 50 0 50 400 0 0 0 0 0 0", "cpu1 50 0 50 400 0 0 0 0 0 0"])
    host = HostTelemetry(tegrastats=None, nvml=False, proc_root=tmp_path / "proc",
                         sys_root=tmp_path / "sys")
    first = host.sample()
    assert first["cpu_percent"] is None  # a share needs two samples
    # cpu0 busy 100 of 100 more jiffies, cpu1 idle: the whole CPU is half busy.
    _fake_proc(tmp_path, ["cpu  200 0 100 900 0 0 0 0 0 0",
                          "cpu0 150 0 50 400 0 0 0 0 0 0", "cpu1 50 0 50 500 0 0 0 0 0 0"])
    s = host.sample()
    assert s["source"] == "proc"
    assert s["cpu_percent"] == 50.0
    assert s["cpu_cores"] == [{"load_percent": 100.0, "freq_mhz": None},
                              {"load_percent": 0.0, "freq_mhz": 1497}]
    assert (s["load1"], s["load5"], s["load15"]) == (0.5, 0.4, 0.3)
    assert (s["mem_total_mb"], s["mem_used_mb"]) == (7812, 1953)
    assert (s["swap_total_mb"], s["swap_used_mb"]) == (1000, 500)
    assert s["temps_c"] == {"cpu-therm": 45.5}


def test_real_proc_of_this_machine() -> None:
    host = HostTelemetry(tegrastats=None)
    host.sample()
    time.sleep(0.05)
    s = host.sample()
    assert s["mem_total_mb"] > 0 and s["load1"] >= 0
    assert len(s["cpu_cores"]) == os.cpu_count()


def test_tegrastats_reader_runs_the_binary(tmp_path: Path) -> None:
    """A stand-in `tegrastats` that prints the AGX Orin line as the real one does (one line
    per --interval): the reader starts it with the interval, keeps the latest line, stops it."""
    fake = tmp_path / "tegrastats"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = --interval ] || exit 2\n"
                    f"while true; do echo '{AGX_ORIN_JP62}'; sleep 0.05; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    host = HostTelemetry(tegrastats=str(fake), interval_ms=50, nvml=False)
    try:
        deadline = time.monotonic() + 10
        while host.sample()["source"] != "tegrastats" and time.monotonic() < deadline:
            time.sleep(0.05)
        s = host.sample()
        assert s["source"] == "tegrastats" and s["power_mw"]["VDD_CPU_CV"] == 1607
        assert s["mem_total_mb"] == 62841 and "load1" in s  # tegrastats over /proc, + load
    finally:
        host.close()
    assert host._tegra is not None and host._tegra._proc.poll() is not None


def test_older_single_frequency_cpu_format() -> None:
    t = parse_tegrastats("RAM 220/38955MB (lfb 847x4MB) CPU [10%,30%,off,off]@2035")
    assert t["cpu_cores"] == [{"load_percent": 10, "freq_mhz": 2035},
                              {"load_percent": 30, "freq_mhz": 2035}, None, None]
    assert t["cpu_percent"] == 10.0
