#!/usr/bin/env bash
# Builds tasker_core and installs it into the PostgreSQL that pg_config names, unless the
# installed copy already came from these sources and this profile.
#   scripts/install.sh [--release]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

profile=debug
args=()
if [ "${1:-}" = "--release" ]; then profile=release; args+=(--release); fi
is_root || args+=(--sudo)

PG_CONFIG="$(command -v pg_config)"
lib="$("$PG_CONFIG" --pkglibdir)/tasker_core.so"
stamp="$ROOT/target/.install-stamp"
# (sql/plproxy is the PL/Proxy router's SQL, not part of the extension)
sources="$(find Cargo.toml Cargo.lock tasker_core.control src crates sql -type f -not -path 'sql/plproxy/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)"
installed="$( [ -f "$lib" ] && sha256sum "$lib" | cut -c1-64 || echo none)"
want="$sources $profile $installed"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    note "tasker_core ($profile) already installed from these sources"
    exit 0
fi
step "building and installing tasker_core ($profile) into $("$PG_CONFIG" --version)"
cargo pgrx install --pg-config "$PG_CONFIG" "${args[@]}" || die "cargo pgrx install failed"
# Earlier versions' install scripts, so `CREATE EXTENSION tasker_core VERSION '0.1.0'` and then
# `ALTER EXTENSION tasker_core UPDATE` work (cargo pgrx install copies the upgrade scripts).
for f in sql/releases/tasker_core--*.sql; do
    as_root install -m 644 "$f" "$("$PG_CONFIG" --sharedir)/extension/"
done
echo "$sources $profile $(sha256sum "$lib" | cut -c1-64)" > "$stamp"
