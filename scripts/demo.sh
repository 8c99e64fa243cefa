#!/usr/bin/env bash
# The whole attested path on one machine, no AWS account: a mock NSM, a KMS
# emulator that honours Recipient, the host proxy and the enclave, over
# unix sockets. Everything it starts is stopped on exit (and on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
work=$(mktemp -d "${TMPDIR:-/tmp}/nitro-keystore-demo.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# kms_policy, start_kms_emulator (shared with scripts/bench.sh).
. scripts/lib.sh

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "demo: $what did not come up; its log follows" >&2
      return 1
    fi
    sleep 0.2
  done
}

if [ -n "${KEYSTORE_DEMO_BIN:-}" ]; then
  # Binaries built earlier (keystore-enclave with feature `mock`), e.g. to
  # run the demo as another user who cannot use this checkout's cargo.
  bin=$KEYSTORE_DEMO_BIN
  say "Using the binaries in $bin"
else
  bin=${CARGO_TARGET_DIR:-target}/debug
  say "Building keystore-enclave, keystore-host and the KMS emulator"
  # The demo runs the enclave with the mock NSM (feature `mock`; production
  # builds lack it). Built on its own: in a multi-package build cargo reads
  # `--features keystore-enclave/mock` as a dependency feature and leaves the
  # enclave's own binary without it.
  cargo build --locked -p keystore-enclave --bins --features mock
  cargo build --locked -p keystore-host -p keystore-tests --bins
fi

# Demo credentials: the emulator accepts exactly these, and the host proxy's
# credentials service hands them to the enclave (on EC2 they come from IMDS).
export AWS_ACCESS_KEY_ID=AKIADEMODEMODEMO0001
export AWS_SECRET_ACCESS_KEY=demo-secret-access-key
export AWS_REGION=us-east-1
unset AWS_SESSION_TOKEN AWS_PROFILE AWS_DEFAULT_REGION

# The mock NSM measures the enclave binary itself: PCR0 = SHA-384 of it,
# just as a real PCR0 is the hash of the EIF.
kms_policy "$bin" "$work" demo
say "Wrote a KMS key policy that lets only PCR0 = ${pcr0:0:16}... decrypt"
jq -c '.Statement[] | select(.Sid == "EnclaveDecrypt") | .Condition' "$work/policy.json"

say "Starting the KMS emulator: HTTPS on 127.0.0.1, checks SigV4, attestation documents and the policy"
start_kms_emulator "$bin" "$work" || exit 1
echo "KMS emulator at $kms_url, key $key_id"

# The enclave's ports serve privileged peers only: on EC2, the parent from a
# vsock source port below 1024; on these unix sockets, root or the user the
# enclave runs as (who could read its memory anyway), so the demo also runs
# as an ordinary user.
say "Starting the enclave with the MOCK NSM (its documents prove nothing outside this demo)"
"$bin/keystore-enclave" --nsm mock --mock-pki "$work/pki" --recipient-bits 2048 \
  --listen "unix://$work/enclave.sock" --load-listen "unix://$work/load.sock" \
  --region us-east-1 --kms-key-arn "$key_id" --kms-host localhost --kms-proxy "unix://$work/kms.sock" \
  --credentials "unix://$work/credentials.sock" --kms-ca "$work/kms-tls/ca.pem" \
  > "$work/enclave.out" 2> "$work/enclave.log" &
pids+=($!)
wait_for 60 "the enclave" test -s "$work/enclave.out" || { cat "$work/enclave.log" >&2; exit 1; }
echo "enclave serving on $(cat "$work/enclave.out")"

say "Encrypting a sample .env: secret values become ENC[v1:kms:...], the rest stays readable"
cat > "$work/secrets.env" <<'ENV'
# Demo secrets (made up)
DB_PASSWORD=correct-horse-battery-staple
export API_TOKEN="tok_demo_4f9a2c"
LOG_LEVEL=info
ENV
"$bin/keystore-host" encrypt --key-id "$key_id" --keys DB_PASSWORD --keys API_TOKEN \
  --region us-east-1 --endpoint-url "$kms_url" --ca-bundle "$work/kms-tls/ca.pem" \
  "$work/secrets.env"
cut -c1-72 "$work/secrets.env"

say "Starting the host proxy: KMS forwarder (bytes only, TLS ends in the enclave), credentials, loader"
RUST_LOG=info "$bin/keystore-host" proxy --region us-east-1 \
  --forward "unix://$work/kms.sock=127.0.0.1:$kms_port" \
  --credentials-listen "unix://$work/credentials.sock" \
  --load-to "unix://$work/load.sock" --secrets "$work/secrets.env" --no-agent \
  --audit-log "$work/audit.jsonl" --audit-poll 1 2> "$work/proxy.log" &
pids+=($!)

enclave=(--enclave "unix://$work/enclave.sock")
ready() { "$bin/keystore-host" "${enclave[@]}" status --json | jq -e '.ready' >/dev/null; }
wait_for 60 "the first load" ready || { tail -20 "$work/proxy.log" "$work/enclave.log" >&2; exit 1; }

say "A host app asks the enclave for DB_PASSWORD over its socket (vsock on EC2)"
"$bin/keystore-host" "${enclave[@]}" get DB_PASSWORD
echo

say "The enclave's status"
"$bin/keystore-host" "${enclave[@]}" status

say "Verifying which enclave answers: a fresh attestation document, our nonce, PCR0 pinned"
"$bin/keystore-host" "${enclave[@]}" attest --root "$work/pki/root.pem" --pcr "0=$pcr0" | head -4

say "What KMS saw: every Decrypt carried an attestation document; no plaintext ever left KMS"
curl -sS --cacert "$work/kms-tls/ca.pem" "$kms_url/__admin/calls" \
  | jq -c 'with_entries(select(.key == "Decrypt" or .key == "Encrypt"))'

say "The audit trail the daemon drained from the enclave: who read what, hash-chained"
audited() { jq -e -s 'map(select(.event.request.op == "get")) | length > 0' "$work/audit.jsonl" >/dev/null 2>&1; }
wait_for 30 "the audit log" audited || { tail -20 "$work/proxy.log" >&2; exit 1; }
jq -c 'select(.event.request) | {seq, op: .event.request.op, names: .event.request.names,
  uid: .event.request.caller.uid, outcome: .event.request.outcome}' "$work/audit.jsonl"

say "Done; stopping everything this demo started"
