#!/usr/bin/env bash
# Boots a micro-VM with kiln's guest kernel and the test guest program, shows
# its console (device checks, then a clean reboot) and the boot metrics.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
exec cargo run --quiet -p kiln-tests --bin kiln-demo -- "$@"
