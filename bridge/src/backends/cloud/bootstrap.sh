set -eu
umask 022

say() { printf 'kiln-bootstrap: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

POLL=${KILN_BOOTSTRAP_POLL:-15}
case $POLL in '' | *[!0-9]*) die "KILN_BOOTSTRAP_POLL must be a whole number of seconds" ;; esac
if [ "${KILN_BOOTSTRAP_POWEROFF:-1}" = 0 ]; then POWER_OFF=0; fi
KILN="$PREFIX/kiln"
STATE="$KILN_HOME/bootstrap/$GRANT_ID"

# Until the grant has ended on this host (its VM stopped, by its deadline
# or a terminate), or the host no longer knows it.
watch() {
	say "watching grant $GRANT_ID"
	while :; do
		reply=$("$KILN" host --home "$KILN_HOME" status "$GRANT_ID" 2>/dev/null) || true
		case $reply in
		*'"phase":"ended"'* | *'"kind":"not_found"'*) break ;;
		esac
		sleep "$POLL"
	done
	say "grant $GRANT_ID has ended"
	end_instance
}

# Startup scripts run again when the instance restarts: the grant ran (its
# VM died with the restart), so it is watched to its end, not run again.
if [ -d "$STATE/started" ]; then
	say "grant $GRANT_ID was already started on this instance; not starting it again"
	watch
	exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-bootstrap.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 143' HUP INT TERM

fetch() {
	if command -v curl >/dev/null 2>&1; then
		curl -fsS --proto =http,https --proto-redir =http,https \
			--connect-timeout 20 --max-time 1800 -o "$1" "$BUNDLE_URL"
	elif command -v wget >/dev/null 2>&1; then
		wget -q -T 20 -t 1 -O "$1" "$BUNDLE_URL"
	else
		die "neither curl nor wget is installed"
	fi
}

say "fetching $BUNDLE_URL"
tries=0
until fetch "$WORK/bundle.tar.gz"; do
	tries=$((tries + 1))
	[ "$tries" -lt 6 ] || die "cannot fetch the bundle from $BUNDLE_URL; nothing was installed"
	say "fetch failed; again in $((tries * 5)) s"
	sleep $((tries * 5))
done
got=$(sha256sum "$WORK/bundle.tar.gz" | cut -d ' ' -f 1)
if [ "$got" != "$BUNDLE_SHA256" ]; then
	die "the bundle from $BUNDLE_URL has SHA-256 $got, not $BUNDLE_SHA256; refused, nothing was installed"
fi
mkdir "$WORK/x"
tar -xzf "$WORK/bundle.tar.gz" -C "$WORK/x" --no-same-owner
rm -f "$WORK/bundle.tar.gz"
for f in $BUNDLE_FILES; do
	[ -f "$WORK/x/$f" ] || die "the bundle holds no $f; nothing was installed"
done

mkdir -p "$PREFIX" "$KILN_HOME"
cp -Rp "$WORK/x/prefix/." "$PREFIX/"
cp -Rp "$WORK/x/home/." "$KILN_HOME/"
rm -rf "$WORK/x"
printf '%s' "$HOST_TOML" >"$KILN_HOME/host.toml"
say "installed $("$KILN" --version 2>/dev/null || echo kiln) in $PREFIX"

mkdir -p "$STATE"
(
	umask 077
	printf '%s\n' "$GRANT_JSON" >"$STATE/grant.json"
	printf '%s\n' "$HOST_KEY" >"$STATE/host_key"
)
# Taken atomically: of two runs at once, one provisions.
if ! mkdir "$STATE/started" 2>/dev/null; then
	rm -f "$STATE/host_key"
	say "grant $GRANT_ID was already started on this instance; not starting it again"
	watch
	exit 0
fi

say "starting grant $GRANT_ID"
status=0
reply=$("$KILN" host --home "$KILN_HOME" provision --host-key "$STATE/host_key" <"$STATE/grant.json") || status=$?
# The VM has its key now; the file is not needed again.
rm -f "$STATE/host_key"
if [ "$status" != 0 ]; then
	die "kiln host provision failed for grant $GRANT_ID: $reply"
fi
printf '%s\n' "$reply" >"$STATE/instance.json"
say "grant $GRANT_ID is running"
printf '%s\n' "$reply"
watch
