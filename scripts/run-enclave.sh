#!/usr/bin/env bash
# Starts the enclave with nitro-cli and waits until it answers `status`.
#
# Usage: scripts/run-enclave.sh [--eif FILE] [--cid N] [--memory MIB] [--cpus N]
#                               [--debug-mode] [--timeout SECONDS]
# --debug-mode exposes the console and zeroes every PCR, so KMS policies made
# by `keystore-host policy` refuse it; use it only to read boot logs.
set -euo pipefail
cd "$(dirname "$0")/.."

eif=build/keystore-enclave.eif
cid=16
memory=1024
cpus=2
debug=0
timeout=60
while [ $# -gt 0 ]; do
  case "$1" in
    --eif) eif=$2; shift 2 ;;
    --cid) cid=$2; shift 2 ;;
    --memory) memory=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --debug-mode) debug=1; shift ;;
    --timeout) timeout=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "run-enclave.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
for n in "$cid" "$memory" "$cpus" "$timeout"; do
  case "$n" in
    ''|*[!0-9]*) echo "run-enclave.sh: '$n' is not a number" >&2; exit 2 ;;
  esac
done
if [ "$cid" -lt 4 ]; then
  echo "run-enclave.sh: enclave CID must be 4 or more (0-3 are reserved; the parent is 3)" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  # The enclave answers only privileged peers (a source port below 1024).
  echo "run-enclave.sh: run as root (sudo): the readiness check reaches the enclave from a privileged port" >&2
  exit 2
fi
[ -f "$eif" ] || { echo "run-enclave.sh: no EIF at $eif (run scripts/build-eif.sh)" >&2; exit 1; }
# sudo's secure_path may leave out /usr/local/bin, where the README installs it.
keystore_host=${KEYSTORE_HOST:-$(command -v keystore-host || echo /usr/local/bin/keystore-host)}
command -v "$keystore_host" >/dev/null 2>&1 || {
  echo "run-enclave.sh: '$keystore_host' not found (install keystore-host or set KEYSTORE_HOST)" >&2
  exit 1
}

args=(run-enclave --eif-path "$eif" --enclave-cid "$cid" --memory "$memory" --cpu-count "$cpus")
if [ "$debug" -eq 1 ]; then
  echo "run-enclave.sh: DEBUG MODE: PCRs read as zero; KMS will refuse this enclave" >&2
  args+=(--debug-mode)
fi
nitro-cli "${args[@]}"

endpoint="vsock://$cid:5000"
echo "Waiting up to ${timeout}s for the enclave at $endpoint..." >&2
deadline=$((SECONDS + timeout))
until "$keystore_host" --enclave "$endpoint" status; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "run-enclave.sh: the enclave did not answer within ${timeout}s; see 'nitro-cli describe-enclaves'" >&2
    exit 1
  fi
  sleep 1
done
