#!/usr/bin/env bash
# Where the block root starts to beat the initramfs root: the demo image
# plus one layer of N MiB of incompressible 256 KiB files, run with
# `kiln run --rootfs initramfs|block -- true`, alternating, warm cache.
# Usage: scripts/bench-rootfs-crossover.sh [RUNS] [MIB ...]
# (default 2 runs, sizes 0 8 32 64). Needs scripts/setup.sh (demo image)
# and a built kiln (KILN defaults to target/debug/kiln). Besides wall time
# it prints the VM's CPU seconds (kiln-vmm's user + system, which on a PVM
# host is mostly the emulated guest kernel): on a busy host that figure
# moves far less than wall time.
set -euo pipefail
runs=${1:-2}
shift || true
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(0 8 32 64)
kiln=${KILN:-target/debug/kiln}
home=${KILN_HOME:-/var/lib/kiln}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "runs $runs, sizes ${sizes[*]} MiB, kiln $kiln"
for mib in "${sizes[@]}"; do
  layout="$tmp/oci-$mib"
  cp -a "$home/demo/oci" "$layout"
  if [ "$mib" -gt 0 ]; then
    files="$tmp/files-$mib"
    mkdir -p "$files/pad"
    for i in $(seq 1 $((mib * 4))); do
      head -c 262144 /dev/urandom > "$files/pad/f$i"
    done
    umoci insert --image "$layout:demo" "$files/pad" /pad >/dev/null
  fi
  for kind in initramfs block; do
    "$kiln" image build --rootfs "$kind" --oci-layout "$layout:demo" >/dev/null
  done
  for r in $(seq 1 "$runs"); do
    for kind in initramfs block; do
      start=$(date +%s.%N)
      stats=$("$kiln" run --json --rootfs "$kind" --oci-layout "$layout:demo" -- true 2>&1 >/dev/null | tail -1)
      end=$(date +%s.%N)
      figures=$(echo "$stats" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["boot_ms"], round(s["cpu_user_seconds"] + s["cpu_system_seconds"], 2))')
      printf '%4s MiB  %-9s run %s  wall %6.2f s  boot %6s ms  VMM cpu %s s\n' "$mib" "$kind" "$r" \
        "$(echo "$end - $start" | bc)" $figures
    done
  done
done
