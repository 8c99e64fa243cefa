# shellcheck shell=bash
# Shell functions shared by scripts/bench.sh and scripts/demo.sh (sourced,
# not run). They expect the caller's `pids` array (everything started is
# added to it, for the caller's cleanup) and its
# `wait_for SECONDS DESCRIPTION COMMAND...`.

# kms_policy BIN WORK NAME: writes WORK/measurements.json and the key policy
# WORK/policy.json that lets only PCR0 = SHA-384 of BIN/keystore-enclave
# decrypt (the mock NSM measures the enclave binary itself, as a real PCR0
# is the hash of the EIF), with roles arn:aws:iam::111122223333:role/NAME-…
# Sets pcr0.
kms_policy() {
  local bin=$1 work=$2 name=$3
  pcr0=$(sha384sum "$bin/keystore-enclave" | cut -d' ' -f1)
  printf '{"Measurements":{"PCR0":"%s","PCR1":"%s","PCR2":"%s"}}\n' "$pcr0" "$pcr0" "$pcr0" \
    > "$work/measurements.json"
  "$bin/keystore-host" policy --measurements "$work/measurements.json" \
    --enclave-role "arn:aws:iam::111122223333:role/$name-parent" \
    --admin "arn:aws:iam::111122223333:role/$name-admin" \
    --encrypt-principal "arn:aws:iam::111122223333:role/$name-operator" > "$work/policy.json"
}

# start_kms_emulator BIN WORK: the KMS emulator on 127.0.0.1 (HTTPS with a
# CA in WORK/kms-tls, SigV4 with $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY,
# attestation documents checked against WORK/pki/root.pem, the key policy
# WORK/policy.json), logging to WORK/kms.log. Sets kms_url, kms_port and
# key_id.
start_kms_emulator() {
  local bin=$1 work=$2
  "$bin/mock-kms" --listen 127.0.0.1:0 --tls-dir "$work/kms-tls" \
    --attestation-root "$work/pki/root.pem" --region us-east-1 \
    --access-key-id "$AWS_ACCESS_KEY_ID" --secret-access-key "$AWS_SECRET_ACCESS_KEY" \
    --key-policy "$work/policy.json" --key-id-file "$work/key-id" \
    --ready-file "$work/kms.url" 2> "$work/kms.log" &
  pids+=($!)
  wait_for 30 "the KMS emulator" test -s "$work/kms.url" || { cat "$work/kms.log" >&2; return 1; }
  kms_url=$(cat "$work/kms.url")
  # Read by the caller.
  # shellcheck disable=SC2034
  kms_port=${kms_url##*:}
  # shellcheck disable=SC2034
  key_id=$(cat "$work/key-id")
}
