#!/usr/bin/env bash
# Installs moto's EC2 server (the AWS tests' emulator) into a venv cached
# outside the repository, keyed by its pinned version, and prints the
# venv's path. Reused while the pin is unchanged.
set -euo pipefail
moto_version=5.2.6
cache=${KILN_CACHE:-/var/cache/kiln}/venvs
dir="$cache/moto-$moto_version"
# Written last: a venv without it is a half-done install.
done_mark="$dir/.kiln-complete"
if [ -e "$done_mark" ]; then
  echo "$dir"
  exit 0
fi
mkdir -p "$cache"
# A venv's scripts name its own path, so it is built where it stays.
rm -rf "$dir"
# Debian's python3 (python3-venv), whatever else is first on PATH.
/usr/bin/python3 -m venv "$dir"
"$dir/bin/pip" install --quiet --disable-pip-version-check "moto[server,ec2]==$moto_version" >&2
touch "$done_mark"
echo "$dir"
