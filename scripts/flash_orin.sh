#!/usr/bin/env bash
# Flash a provisioned Jetson AGX Orin devkit with the edge-runtime overlay (JetPack 6.x).
#
#   scripts/flash_orin.sh --provisioned OUT --device ID --bundle DIR [--wheelhouse DIR]
#                         [--l4t ~/nvidia/Linux_for_Tegra] [--dry-run]
#
# 1. `edge-fleet image` builds the device's root-file-system overlay and checks it (units
#    pass systemd-analyze verify, the first bundle verifies against the shipped trust store,
#    the certificate chains to the CA and matches its key, modes and owners).
# 2. Without --dry-run: the overlay is copied into Linux_for_Tegra/rootfs (the sample rootfs,
#    after sudo ./apply_binaries.sh) and the board, in recovery mode (hold REC, press RESET;
#    `lsusb` shows 0955:7023 or 0955:7045), is flashed to its eMMC with NVIDIA's initrd
#    flasher. Needs root on an x86 Ubuntu host. The rootfs is modified in place: start from a
#    fresh copy per device (README § Jetson, mass flashing).
set -euo pipefail
cd "$(dirname "$0")/.."
provisioned="" device="" bundle="" wheelhouse="" l4t="${L4T_DIR:-$HOME/nvidia/Linux_for_Tegra}"
dry_run=0 board="jetson-agx-orin-devkit" out=".overlays"
while [ $# -gt 0 ]; do
    case "$1" in
        --provisioned) provisioned="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --bundle) bundle="$2"; shift 2 ;;
        --wheelhouse) wheelhouse="$2"; shift 2 ;;
        --l4t) l4t="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --board) board="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        *) echo "flash_orin.sh: error: unknown argument $1 (see the header of $0)" >&2; exit 1 ;;
    esac
done
if [ -z "$provisioned" ] || [ -z "$device" ] || [ -z "$bundle" ]; then
    echo "flash_orin.sh: error: --provisioned, --device and --bundle are required" >&2
    exit 1
fi
fleet="${EDGE_FLEET:-edge-fleet}"
args=(image --provisioned "$provisioned" --device "$device" --bundle "$bundle" --out "$out")
[ -n "$wheelhouse" ] && args+=(--wheelhouse "$wheelhouse")
"$fleet" "${args[@]}"   # exits 1 if a check failed: nothing is flashed
if [ "$dry_run" = 1 ]; then
    echo "dry run: overlay $out/$device built and checked; no board touched"
    exit 0
fi
if [ ! -x "$l4t/tools/kernel_flash/l4t_initrd_flash.sh" ]; then
    echo "flash_orin.sh: error: no L4T at $l4t: unpack Jetson_Linux_R36.x and the sample rootfs, run sudo ./apply_binaries.sh, or pass --l4t DIR" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "flash_orin.sh: error: flashing needs root: sudo $0 ..." >&2
    exit 1
fi
# -a keeps modes and the enable symlinks; owners are root (tmpfiles.d sets the daemon's).
cp -a "$out/$device/." "$l4t/rootfs/"
cd "$l4t"
# The AGX Orin devkit's internal eMMC (JetPack 6: L4T 36.x), as NVIDIA's quick start shows;
# mass flashing of several boards: README § Jetson.
./flash.sh "$board" internal
