#!/usr/bin/env bash
# `make audit`: cargo-deny against the RustSec advisory database snapshot, offline.
#
# The snapshot is plain files (no network here to fetch the real database).
# cargo-deny 0.20 wants a git work tree named advisory-db-3157b0e258782691 under
# deny.toml's [advisories] db-path, so the snapshot is copied there, committed
# with the snapshot's own date (cargo-deny reads the database's age from the
# last commit), and rebuilt whenever SNAPSHOT changes.
#
# Where the snapshot is, first found:
#   $ECHO_ADVISORY_DB, <repo>/../shared/advisory-db, <repo>/../../shared/advisory-db,
#   /work/shared/advisory-db
# Usage: audit.sh [extra cargo-deny check args]; env DENY_CONFIG overrides deny.toml.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
config=${DENY_CONFIG:-$repo/deny.toml}

if ! command -v cargo-deny >/dev/null; then
  echo "audit: cargo-deny is not installed: cargo install --locked cargo-deny (.ci/run does this)" >&2
  exit 1
fi

src=${ECHO_ADVISORY_DB:-}
if [ -z "$src" ]; then
  for candidate in "$repo/../shared/advisory-db" "$repo/../../shared/advisory-db" /work/shared/advisory-db; do
    if [ -f "$candidate/SNAPSHOT" ] && [ -d "$candidate/crates" ]; then src=$candidate; break; fi
  done
fi
if [ -z "$src" ] || [ ! -d "$src/crates" ]; then
  echo "audit: no RustSec advisory-db snapshot found (looked at \$ECHO_ADVISORY_DB, ../shared/advisory-db," >&2
  echo "       ../../shared/advisory-db, /work/shared/advisory-db). Point ECHO_ADVISORY_DB at a checkout of" >&2
  echo "       https://github.com/rustsec/advisory-db (a directory with crates/ and SNAPSHOT or .git)." >&2
  exit 1
fi

# db-path from the config; cargo-deny resolves a relative one against its working
# directory, which is the repository (see the cd below).
db_path=$(sed -n 's/^db-path *= *"\(.*\)"/\1/p' "$config")
case "$db_path" in /*) ;; *) db_path="$repo/$db_path" ;; esac
dest="$db_path/advisory-db-3157b0e258782691"

snapshot_id=$(cat "$src/SNAPSHOT" 2>/dev/null || git -C "$src" rev-parse HEAD)
if [ "$(cat "$dest/.echo-snapshot" 2>/dev/null)" != "$snapshot_id" ]; then
  rm -rf "$dest"
  mkdir -p "$dest"
  (cd "$src" && tar --exclude=.git -cf - .) | tar -C "$dest" -xf -
  date=$(sed -n 's/^date: *//p' "$src/SNAPSHOT" 2>/dev/null || true)
  date=${date:-$(git -C "$src" log -1 --format=%cI 2>/dev/null || date -u +%FT%TZ)}
  (
    cd "$dest"
    git init -q
    git add -A
    GIT_AUTHOR_DATE=$date GIT_COMMITTER_DATE=$date \
      git -c user.name=audit -c user.email=audit@localhost -c commit.gpgsign=false commit -q -m "snapshot $snapshot_id"
  )
  printf '%s' "$snapshot_id" > "$dest/.echo-snapshot"
fi

echo "audit: advisory database $(head -c 200 "$src/SNAPSHOT" 2>/dev/null | tr '\n' ' ')"
cd "$repo"
# cargo-deny reads `cargo metadata` for every platform (the lock file lists Windows-only
# crates too); fetch them once (a no-op when cached; the build fetches the rest anyway).
cargo fetch --locked --manifest-path "${MANIFEST:-$repo/Cargo.toml}" >/dev/null
[ $# -gt 0 ] || set -- advisories bans licenses sources
# --workspace: every workspace member (the service and the bench crates) is a root.
exec cargo deny --offline --locked --config "$config" --manifest-path "${MANIFEST:-$repo/Cargo.toml}" --workspace check --hide-inclusion-graph "$@"
