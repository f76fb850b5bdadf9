#!/usr/bin/env bash
# Builds the FROM-scratch image without a Docker engine and smoke-runs it:
#   1. a static outrider (glibc with crt-static; no musl toolchain needed),
#   2. `buildah bud` of deploy/Dockerfile.scratch (vfs storage, chroot isolation: no daemon,
#      no user namespaces),
#   3. `buildah run` of `outrider --version` inside the image, checked against the binary's.
# Optional: OCI_ARCHIVE=path also exports the image as an OCI archive.
# Environment: PROFILE (release|dev, default release), IMAGE (default localhost/outrider:0.1.0),
# CARGO_TARGET_DIR (honoured).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
profile="${PROFILE:-release}"
image="${IMAGE:-localhost/outrider:0.1.0}"
target_triple=x86_64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-$root/target}"
buildah=(buildah --storage-driver vfs)

command -v buildah >/dev/null || {
  echo "build-image.sh: buildah is not installed (Debian: apt-get install buildah)" >&2
  exit 1
}

cd "$root"
RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --locked -p outrider --profile "$profile" --target "$target_triple"
dir="$profile"
[[ "$profile" == dev ]] && dir=debug
binary="$target_dir/$target_triple/$dir/outrider"
if ldd "$binary" 2>&1 | grep -q '=>'; then
  echo "build-image.sh: $binary is not static" >&2
  exit 1
fi

context="$(mktemp -d)"
container=""
cleanup() {
  [[ -n "$container" ]] && "${buildah[@]}" rm "$container" >/dev/null 2>&1 || true
  rm -rf "$context"
}
trap cleanup EXIT
cp "$binary" "$context/outrider"
# The release profile keeps the symbol table (for bench/link-order.sh); the image does not need it.
strip "$context/outrider"

"${buildah[@]}" bud --isolation chroot -f deploy/Dockerfile.scratch -t "$image" "$context"
container="$("${buildah[@]}" from "$image")"
got="$("${buildah[@]}" run --isolation chroot "$container" -- /usr/local/bin/outrider --version)"
want="$("$binary" --version)"
if [[ "$got" != "$want" ]]; then
  echo "build-image.sh: the image says '$got', the binary '$want'" >&2
  exit 1
fi
user="$("${buildah[@]}" inspect --format '{{.OCIv1.Config.User}}' "$image")"
[[ "$user" == "2102:2102" ]] || {
  echo "build-image.sh: image user is '$user', want 2102:2102" >&2
  exit 1
}
if [[ -n "${OCI_ARCHIVE:-}" ]]; then
  "${buildah[@]}" push "$image" "oci-archive:$OCI_ARCHIVE"
fi
echo "ok: $image runs: $got (user $user)"
