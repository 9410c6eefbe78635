#!/usr/bin/env bash
# Packs static busybox as a small OCI image (layout at $1, tag `demo`) whose
# default command shows what the micro-VM it runs in looks like. `kiln demo`
# runs it; rebuilt only when this script or busybox changes.
set -euo pipefail
out=${1:?usage: build-demo-image.sh OUTPUT_LAYOUT_DIR}
key=$(cat "$0" /bin/busybox | sha256sum | cut -c1-16)
if [ -f "$out/index.json" ] && [ "$(cat "$out/kiln-demo-key" 2>/dev/null)" = "$key" ]; then
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
umoci init --layout "$tmp/oci"
umoci new --image "$tmp/oci:demo"
umoci unpack --image "$tmp/oci:demo" "$tmp/bundle" >/dev/null
root="$tmp/bundle/rootfs"
mkdir -p "$root/bin" "$root/etc" "$root/root" "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
umoci repack --image "$tmp/oci:demo" "$tmp/bundle"

script='echo "hello from a kiln micro-VM"
echo "kernel:     $(uname -sr)"
echo "cpus:       $(nproc)"
echo "memory:     $(awk "/MemTotal/ {printf \"%d MiB\", \$2/1024}" /proc/meminfo)"
echo "uptime:     $(cut -d" " -f1 /proc/uptime) s"
echo "hypervisor: $(grep -q hypervisor /proc/cpuinfo && echo yes || echo no)"'
umoci config --image "$tmp/oci:demo" --config.env PATH=/bin \
  --config.cmd /bin/sh --config.cmd -c --config.cmd "$script"
umoci gc --layout "$tmp/oci"
echo "$key" > "$tmp/oci/kiln-demo-key"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$tmp/oci" "$out"
echo "setup: demo image at $out"
