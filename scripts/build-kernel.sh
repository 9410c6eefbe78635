#!/usr/bin/env bash
# Builds kiln's guest kernel (vmlinux for PVH boot, and a bzImage) from Debian's
# linux-source-6.12, vmm/guest-kernel/config.fragment and
# vmm/guest-kernel/patches/*.patch.
# The result is cached outside the repo, keyed by a hash of every input, and
# installed at $KILN_HOME/kernel/{vmlinux,bzImage} where kiln-vmm finds it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
recipe="$repo/vmm/guest-kernel"
cache_root=${KILN_CACHE:-/var/cache/kiln}
kiln_home=${KILN_HOME:-/var/lib/kiln}
source_tar=/usr/src/linux-source-6.12.tar.xz

[ -f "$source_tar" ] || { echo "build-kernel: $source_tar missing (apt-get install linux-source-6.12)" >&2; exit 1; }

source_version=$(dpkg-query -W -f='${Version}' linux-source-6.12)
key=$( {
  echo "linux-source-6.12 $source_version"
  cat "$recipe/config.fragment"
  cat "$recipe"/patches/*.patch
  # The recipe itself is an input too.
  sed -n '/^# --- recipe ---$/,$p' "$0"
} | sha256sum | cut -c1-16)
out="$cache_root/kernel/$key"

install_kernel() {
  mkdir -p "$kiln_home/kernel"
  for f in vmlinux bzImage config; do
    cp -f "$out/$f" "$kiln_home/kernel/$f.tmp"
    mv -f "$kiln_home/kernel/$f.tmp" "$kiln_home/kernel/$f"
  done
  echo "$key" >"$kiln_home/kernel/key"
  echo "build-kernel: kernel $key installed in $kiln_home/kernel"
}

mkdir -p "$cache_root/kernel"
exec 9>"$cache_root/kernel/.lock"
flock 9

if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  echo "build-kernel: cached ($key)"
  install_kernel
  exit 0
fi

# --- recipe ---
work=$(mktemp -d "${TMPDIR:-/var/tmp}/kiln-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build-kernel: building $key in $work (about 6-7 min on 2 cores)"
tar -xf "$source_tar" -C "$work"
src="$work/linux-source-6.12"
for p in "$recipe"/patches/*.patch; do
  patch -d "$src" -p1 --quiet --forward <"$p"
done
make -C "$src" -s tinyconfig
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$recipe/config.fragment" >/dev/null
make -C "$src" -s olddefconfig
# Every line of the fragment must have survived olddefconfig: a silently
# dropped option is a kernel that differs from the recipe.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qxF "$line" "$src/.config" || { echo "build-kernel: not applied: $line" >&2; missing=1; } ;;
    "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}
      if grep -q "^$opt=" "$src/.config"; then echo "build-kernel: not disabled: $opt" >&2; missing=1; fi ;;
  esac
done <"$recipe/config.fragment"
[ "$missing" = 0 ] || exit 1
make -C "$src" -s -j"$(nproc)" vmlinux bzImage
tmp_out="$out.tmp.$$"
mkdir -p "$tmp_out"
cp "$src/vmlinux" "$tmp_out/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$tmp_out/bzImage"
cp "$src/.config" "$tmp_out/config"
rm -rf "$out"
mv "$tmp_out" "$out"
install_kernel
