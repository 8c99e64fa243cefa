#!/usr/bin/env bash
# Runs every fuzz target for a while, seeded with the real-world vectors.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# cargo-fuzz uses nightly-only flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them, so no second toolchain is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1

seed() { # seed TARGET FILE...
  local dir="fuzz/corpus/$1"; shift
  mkdir -p "$dir"
  cp -n "$@" "$dir/" 2>/dev/null || true
}
seed cms_open tests/vectors/nitro-kms/cms/*.ber
seed attestation_parse tests/vectors/nitro-kms/attestation/*.cose
seed audit_verify fuzz/seeds/audit_verify/*
seed secrets_file_parse fuzz/seeds/secrets_file_parse/*

for target in $(cd fuzz && cargo fuzz list); do
  echo "== fuzzing $target for ${secs}s"
  (cd fuzz && cargo fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=2048)
done
