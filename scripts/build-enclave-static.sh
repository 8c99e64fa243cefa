#!/usr/bin/env bash
# Builds keystore-enclave as a static, reproducible release binary and prints
# its path. Dockerfile.enclave runs this very script, and so does the test
# command, so the flags proven here are the flags that ship.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
src=$(pwd)
cargo_home=${CARGO_HOME:-$HOME/.cargo}

# Same inputs, same bytes: fixed timestamps, no incremental state, no build
# paths or build ids in the binary (PCR0 depends on every byte of it).
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 1)}"
export CARGO_INCREMENTAL=0
export RUSTFLAGS="-C target-feature=+crt-static -C link-arg=-Wl,--build-id=none \
--remap-path-prefix=${cargo_home}=/cargo --remap-path-prefix=${src}=/src"

# An explicit --target keeps crt-static away from build scripts and proc-macros.
# No --features: the production enclave has no mock NSM (scripts/check-layout.sh).
cargo build --release --locked -p keystore-enclave --target "$target" >&2

bin="${CARGO_TARGET_DIR:-target}/$target/release/keystore-enclave"
if readelf -l "$bin" | grep -q 'INTERP'; then
  echo "build-enclave-static.sh: $bin is dynamically linked" >&2
  exit 1
fi
echo "$bin"
