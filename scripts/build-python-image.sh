#!/usr/bin/env bash
# Builds (or reuses) the real-image test and benchmark image: Debian
# bookworm --variant=minbase with python3, as one umoci layer in an OCI
# layout (tag `py`). It is cached outside the repository under
# ${KILN_CACHE:-/var/cache/kiln}/test-images/python-KEY/oci, KEY hashing
# this script (which holds the suite, variant and package list), and built
# under a lock so parallel tests build it once. Prints the layout path.
# Needs root (debootstrap) and the Debian mirror this machine's apt uses.
set -euo pipefail

suite=bookworm
variant=minbase
packages=python3

key=$(cat "$0" | sha256sum | cut -c1-16)
cache=${KILN_CACHE:-/var/cache/kiln}/test-images
dir="$cache/python-$key"
out="$dir/oci"
mkdir -p "$cache"

# The mirror apt is configured with (deb822 sources first, then the
# one-line format), so the image comes from where this machine's packages do.
mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v suite="$suite" '
      /^[[:space:]]*$/ { if (uri != "" && ok) { print uri; exit } uri = ""; ok = 0; next }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
      END { if (uri != "" && ok) print uri }' "$f" | head -n1
  done
  if [ -f /etc/apt/sources.list ]; then
    awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }' /etc/apt/sources.list
  fi
}

exec 9>"$dir.lock"
flock 9
if [ -f "$out/index.json" ] && [ -f "$dir/done" ]; then
  echo "$out"
  exit 0
fi

url=$(mirror | head -n1)
if [ -z "$url" ]; then
  echo "build-python-image: no Debian mirror for $suite in the apt sources" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "build-python-image: run as root (debootstrap needs it)" >&2
  exit 1
fi

tmp=$(mktemp -d "$cache/.python-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root="$tmp/rootfs"
debootstrap --variant="$variant" --include="$packages" "$suite" "$root" "$url" >"$tmp/debootstrap.log" 2>&1 || {
  tail -n 20 "$tmp/debootstrap.log" >&2
  exit 1
}
# Lean: the package lists and download caches are of no use in the image.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/var/log/*.log "$root"/var/log/apt/*
chroot "$root" python3 -c 'import sqlite3, ssl' || {
  echo "build-python-image: python3 in the image cannot import sqlite3, ssl" >&2
  exit 1
}

umoci init --layout "$tmp/oci"
umoci new --image "$tmp/oci:py"
# One layer holding the whole tree at /: umoci writes the root entry as
# `/`, as such pipelines do (the image builder must accept it).
umoci insert --image "$tmp/oci:py" "$root" /
umoci config --image "$tmp/oci:py" \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env LANG=C.UTF-8 \
  --config.cmd python3 --config.cmd -c --config.cmd 'import sys; print(sys.version)'
umoci gc --layout "$tmp/oci"

rm -rf "$dir"
mkdir -p "$dir"
mv "$tmp/oci" "$out"
touch "$dir/done"
echo "$out"
