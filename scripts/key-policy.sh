#!/usr/bin/env bash
# Writes the KMS key policy that lets only this enclave build decrypt.
# A thin wrapper: all arguments go to `keystore-host policy` (see --help),
# with the measurements of the last build-eif.sh run by default.
#
# Usage: scripts/key-policy.sh --enclave-role ARN --admin ARN [--also OLD.json] ...
set -euo pipefail
cd "$(dirname "$0")/.."
keystore_host=${KEYSTORE_HOST:-keystore-host}
measurements=build/measurements.json
case " $* " in
  *" --measurements "*) exec "$keystore_host" policy "$@" ;;
  *) exec "$keystore_host" policy --measurements "$measurements" "$@" ;;
esac
