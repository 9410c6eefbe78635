#!/usr/bin/env bash
# `kiln run IMAGE -- CMD` booted (--cold) against restored from the saved
# snapshot (warm), alternating, RUNS of each (default 10), then medians and
# the warm/cold ratio of wall time and of boot (VMM start to the agent's
# ready). The image defaults to the demo (busybox) that scripts/setup.sh
# packs; CMD to `true`.
# Usage: scripts/bench-warm-run.sh [RUNS] [OCI-LAYOUT:TAG] [-- CMD...]
# Needs a built kiln (KILN, default target/debug/kiln) and kiln-vmm beside it.
set -euo pipefail
runs=${1:-10}
home=${KILN_HOME:-/var/lib/kiln}
image=${2:-$home/demo/oci:demo}
shift $(( $# > 2 ? 2 : $# ))
[ "${1:-}" = "--" ] && shift
cmd=("$@")
[ ${#cmd[@]} -gt 0 ] || cmd=(true)
kiln=${KILN:-target/debug/kiln}
out=$(mktemp)
trap 'rm -f "$out"' EXIT

run() { # MODE FLAGS...: one run, one line "MODE wall_ms boot_ms run_ms start"
  local mode=$1; shift
  local t0 t1 stats
  t0=$(date +%s%N)
  stats=$("$kiln" run --json "$@" --oci-layout "$image" -- "${cmd[@]}" 2>&1 >/dev/null | tail -1)
  t1=$(date +%s%N)
  python3 - "$mode" $(( (t1 - t0) / 1000000 )) "$stats" <<'PY' | tee -a "$out"
import json, sys
mode, wall, stats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(mode, wall, stats["boot_ms"], stats["run_ms"], stats["start"])
PY
}

echo "image $image, command ${cmd[*]}, $runs runs each, kiln $kiln"
echo "mode wall_ms boot_ms run_ms start"
# The first warm-mode run saves the snapshot; it is not counted.
run setup >/dev/null
for _ in $(seq 1 "$runs"); do
  run cold --cold
  run warm
done
python3 - "$out" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
def med(mode, col):
    return statistics.median(int(r[col]) for r in rows if r[0] == mode)
bad = [r for r in rows if r[0] in ("cold", "warm") and r[0] != r[4]]
if bad:
    sys.exit(f"runs that did not start as asked: {bad}")
for col, name in ((1, "wall"), (2, "boot"), (3, "run")):
    c, w = med("cold", col), med("warm", col)
    print(f"median {name}: cold {c:.0f} ms, warm {w:.0f} ms, warm/cold {w / c:.3f}")
PY
