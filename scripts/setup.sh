#!/usr/bin/env bash
# Installs everything kiln and its tests need on Debian bookworm (as root),
# builds the workspace, and builds (or reuses) the cached guest kernel.
# Idempotent: a second run only checks.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (it installs Debian packages and uses /dev/kvm)" >&2
  exit 1
fi

packages=(
  # guest kernel build
  linux-source-6.12 flex bison libelf-dev bc build-essential xz-utils libssl-dev
  # initramfs tooling and guest userland for tests
  cpio zstd busybox-static
  # image builder tests: a real registry, daemonless image tools, lz4 -d
  docker-registry skopeo umoci lz4
  # block roots: erofs-utils checks the erofs writer's images in tests;
  # mkfs.ext4 formats `kiln run --disk` scratch disks
  erofs-utils e2fsprogs
  # the real-image tests and benchmark: a Debian+python3 image made with
  # debootstrap (scripts/build-python-image.sh); mksquashfs is the peer of
  # the image build benchmark
  debootstrap squashfs-tools
  # the boot-time peer for benchmarks
  qemu-system-x86
  # tests: setpriv (util-linux), OpenSSH client; OpenSSH server for the
  # owned hosts the fleet tests start in network namespaces (never the
  # system's own sshd, which this script does not start)
  util-linux openssh-client openssh-server
  # the cloud tests: moto's EC2 server in a venv (scripts/moto-venv.sh);
  # curl fetches the kiln bundle in the cloud bootstrap script's test
  python3-venv curl
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  # Packages with services (openssh-server, docker-registry) must not start
  # them: the tests run their own instances on loopback or in namespaces.
  # A policy-rc.d that says no, for this install only, unless one exists.
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found: install a stable Rust toolchain (rustup) first" >&2
  exit 1
fi
# scripts/fuzz.sh (run by test.sh) needs nightly; it is optional, and
# fuzzing is skipped without it.
rustup toolchain list 2>/dev/null | grep -q '^nightly' \
  || echo "setup: note: no nightly toolchain; scripts/fuzz.sh will skip fuzzing (rustup toolchain install nightly)" >&2
[ -e /dev/kvm ] || echo "setup: warning: /dev/kvm missing; micro-VMs cannot run on this host" >&2

"$repo/scripts/build-kernel.sh"
cargo build --workspace --quiet

# The agent runs as PID 1 in a bare initramfs: a static binary, built for
# size (the `guest` profile in Cargo.toml), installed where `kiln image
# build` looks for it.
kiln_home=${KILN_HOME:-/var/lib/kiln}
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$repo/target/guest" \
  cargo build --quiet --profile guest --target x86_64-unknown-linux-gnu -p kiln-agent --bin kiln-agent
install -D -m 0755 "$repo/target/guest/x86_64-unknown-linux-gnu/guest/kiln-agent" "$kiln_home/bin/kiln-agent"

"$repo/scripts/build-demo-image.sh" "$kiln_home/demo/oci"
# The real-image tests' Debian+python3 image, cached outside the repo
# (a few minutes once; reused while its recipe is unchanged).
"$repo/scripts/build-python-image.sh" >/dev/null
# moto's EC2 server for the aws backend's tests, cached outside the repo
# (about 30 s once; reused while its pinned version is unchanged).
"$repo/scripts/moto-venv.sh" >/dev/null
echo "setup: done"
