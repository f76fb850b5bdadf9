#!/usr/bin/env bash
# Runs `cargo nextest run -p outrider ARGS` against this checkout's own `outrider` binary.
# When several checkouts share one CARGO_TARGET_DIR, the uplifted `target/debug/outrider` is
# whichever checkout built last, so integration tests may run another branch's binary. The
# per-checkout copy in `deps/` (its hash depends on the checkout's path) is stable: the newest
# one built in this checkout (its debug info names the checkout's directory) is copied aside and
# passed to the harness as OUTRIDER_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target="${CARGO_TARGET_DIR:-target}"
cargo build -p outrider --bin outrider >&2
own=""
# Right after the build the uplifted binary is a hard link to this checkout's deps/ file,
# unless another checkout replaced it meanwhile: then fall back to the newest of ours.
uplifted_inode=$(stat -c %i "$target/debug/outrider")
for f in $(ls -t "$target"/debug/deps/outrider-* | grep -v '\.d$'); do
  if [ "$(stat -c %i "$f")" = "$uplifted_inode" ] && grep -q "$root" "$f"; then own="$f"; break; fi
done
[ -n "$own" ] || for f in $(ls -t "$target"/debug/deps/outrider-* | grep -v '\.d$'); do
  if [ -x "$f" ] && grep -q "$root" "$f" && grep -q 'log-format' "$f"; then own="$f"; break; fi
done
[ -n "$own" ] || { echo "no outrider binary of $root found in $target" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp "$own" "$dir/outrider"
echo "using $own (copied to $dir/outrider)" >&2
OUTRIDER_BIN="$dir/outrider" cargo nextest run -p outrider "$@"
