#!/usr/bin/env bash
# Builds the enclave image and its EIF on the parent instance, then saves and
# prints the measurements a KMS key policy pins.
#
# Usage: scripts/build-eif.sh --kms-key-arn ARN [--kms-key-arn ARN ...]
#                             [--tag IMAGE] [--out DIR] [--region REGION]
#                             [--signing-certificate CERT.pem --private-key KEY.pem]
# The key ARN(s) and the region are baked into the measured image: the enclave
# decrypts only with those keys (aliases are refused: pin the key ARN).
# Writes DIR/keystore-enclave.eif and DIR/measurements.json (nitro-cli's own
# JSON: {"Measurements": {"HashAlgorithm", "PCR0", "PCR1", "PCR2"[, "PCR8"]}}).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=nitro-keystore-enclave:latest
out=build
region=${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}
cert=
key=
key_arns=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --region) region=$2; shift 2 ;;
    --kms-key-arn) key_arns+=("$2"); shift 2 ;;
    --signing-certificate) cert=$2; shift 2 ;;
    --private-key) key=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build-eif.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
if { [ -n "$cert" ] && [ -z "$key" ]; } || { [ -z "$cert" ] && [ -n "$key" ]; }; then
  echo "build-eif.sh: --signing-certificate and --private-key go together" >&2
  exit 2
fi
if [ "${#key_arns[@]}" -eq 0 ]; then
  echo "build-eif.sh: give the KMS key ARN the enclave may use: --kms-key-arn arn:aws:kms:$region:ACCOUNT:key/KEY-ID" >&2
  exit 2
fi
if [ "${#key_arns[@]}" -gt 8 ]; then
  echo "build-eif.sh: at most 8 --kms-key-arn" >&2
  exit 2
fi
arn_re='^arn:aws[a-z-]*:kms:([a-z0-9-]+):[0-9]{12}:key/(mrk-[0-9a-f]{32}|[0-9a-f-]{36})$'
for arn in "${key_arns[@]}"; do
  case "$arn" in
    alias/*|*:alias/*)
      echo "build-eif.sh: $arn is an alias; pin the key ARN it points to:" >&2
      echo "  aws kms describe-key --key-id $arn --query KeyMetadata.Arn --output text" >&2
      exit 2 ;;
  esac
  if ! [[ $arn =~ $arn_re ]]; then
    echo "build-eif.sh: $arn is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/KEY-ID)" >&2
    exit 2
  fi
  if [ "${BASH_REMATCH[1]}" != "$region" ]; then
    echo "build-eif.sh: key $arn is in ${BASH_REMATCH[1]}, but the enclave calls KMS in $region (--region)" >&2
    exit 2
  fi
done
key_list=$(IFS=,; echo "${key_arns[*]}")
for tool in docker nitro-cli jq; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "build-eif.sh: '$tool' is not installed (see README, Deploy on EC2)" >&2
    exit 1
  }
done

mkdir -p "$out"
epoch=$(git log -1 --format=%ct 2>/dev/null || echo 1)
echo "Building image $tag for KMS in $region, pinned to $key_list (SOURCE_DATE_EPOCH=$epoch)..." >&2
docker build --file Dockerfile.enclave --tag "$tag" \
  --build-arg SOURCE_DATE_EPOCH="$epoch" --build-arg KMS_REGION="$region" \
  --build-arg KMS_KEY_ARNS="$key_list" .

eif="$out/keystore-enclave.eif"
args=(build-enclave --docker-uri "$tag" --output-file "$eif")
if [ -n "$cert" ]; then
  args+=(--signing-certificate "$cert" --private-key "$key")
fi
echo "Building EIF $eif..." >&2
nitro-cli "${args[@]}" > "$out/measurements.json"

if ! jq -e '.Measurements.PCR0 and .Measurements.PCR1 and .Measurements.PCR2' \
    "$out/measurements.json" >/dev/null; then
  echo "build-eif.sh: nitro-cli printed no PCR0/PCR1/PCR2 measurements" >&2
  exit 1
fi
if [ -n "$cert" ] && ! jq -e '.Measurements.PCR8' "$out/measurements.json" >/dev/null; then
  echo "build-eif.sh: a signed EIF must report PCR8" >&2
  exit 1
fi
echo "EIF: $eif" >&2
echo "Measurements ($out/measurements.json):" >&2
jq -r '.Measurements | to_entries[] | select(.key | startswith("PCR")) | "  \(.key) \(.value)"' \
  "$out/measurements.json"
