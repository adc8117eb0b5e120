# Shared helpers for the tasker_core scripts. Source it; do not run it.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# cargo-pgrx must match the pgrx that Cargo.toml pins (pgrx = "=X.Y.Z"): read it from there
PGRX_VERSION="$(sed -n 's/^pgrx = "=\([0-9.]*\)"$/\1/p' "$ROOT/Cargo.toml")"
[ -n "$PGRX_VERSION" ] || { echo 'Cargo.toml pins no pgrx version (pgrx = "=X.Y.Z")' >&2; exit 1; }
CARGO_FUZZ_VERSION=0.13.2
PG_MAJOR=15

step() { printf '\n\033[1;34m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }

# Runs a command with root rights: directly as root, through sudo otherwise.
as_root() {
    if is_root; then "$@"; else sudo "$@"; fi
}

# Runs a command as the user that owns throwaway clusters: `postgres` when we are root
# (PostgreSQL refuses to run as root), ourselves otherwise.
as_pg() {
    if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bindir() { "$(command -v pg_config)" --bindir; }
