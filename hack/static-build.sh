#!/usr/bin/env bash
# Builds the release binary the container image ships: fully static (glibc with
# crt-static; TLS is rustls, no OpenSSL), then checks that it is static and runs.
# The Dockerfile runs this same script. Prints the binary's path as the last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=x86_64-unknown-linux-gnu
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" --bin pullkeeper >&2
bin="${CARGO_TARGET_DIR:-target}/$target/release/pullkeeper"

linkage="$(ldd "$bin" 2>&1 || true)"
if ! grep -qE "not a dynamic executable|statically linked" <<<"$linkage"; then
  echo "error: $bin is dynamically linked:" >&2
  echo "$linkage" >&2
  exit 1
fi
"$bin" --version >&2
"$bin" crds | grep "kind: CustomResourceDefinition" >/dev/null # reads it all: no broken pipe
echo "static binary OK: $(du -h "$bin" | cut -f1)" >&2
echo "$bin"
