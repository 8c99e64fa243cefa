#!/usr/bin/env bash
# Checks that the production enclave carries no test code:
#   (a) the KMS emulator crate (keystore-tests) does not depend on the enclave;
#   (b) the enclave, built as scripts/build-enclave-static.sh builds it, does
#       not enable the mock NSM or the CMS sealer;
#   (c) the given static enclave binary does not contain the mock NSM marker;
#   (d) a mock-enabled debug enclave binary does contain it, so (c) can fail;
#   (e) the static binary refuses `--nsm mock` with a clear message;
#   (f) production code accepts connections in one place only: the accept
#       loop in shared/src/serve.rs (endpoint.rs holds the per-transport
#       accept that loop calls).
#   (g) the enclave links no YAML parser: the host turns the operator's
#       access rules into JSON (docs/DESIGN.md, "Rules (issue 12)").
# Usage: scripts/check-layout.sh STATIC_ENCLAVE_BINARY
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 1 ]; then
  echo "usage: $0 STATIC_ENCLAVE_BINARY" >&2
  exit 2
fi
static_bin=$1
mock_bin=${CARGO_TARGET_DIR:-target}/debug/keystore-enclave
target=x86_64-unknown-linux-gnu
failed=0
fail() {
  echo "check-layout: FAIL: $*" >&2
  failed=1
}

# The marker is whatever the mock uses, read from its source.
marker=$(sed -n 's/^pub const MOCK_NSM_MARKER: &str = "\(.*\)";$/\1/p' nsm/src/mock.rs)
if [ -z "$marker" ]; then
  echo "check-layout: cannot find MOCK_NSM_MARKER in nsm/src/mock.rs" >&2
  exit 1
fi

# (a)
tests_tree=$(cargo tree --locked -p keystore-tests -e normal,build,dev --prefix none)
if grep -q '^keystore-enclave ' <<<"$tests_tree"; then
  fail "keystore-tests depends on keystore-enclave"
fi

# (b) Same package, same target, no --features: what the static build
# compiles. `-f '{p} {f}'` lists each package's enabled features (the
# `-e features` tree omits features turned on by another feature).
enclave_tree=$(cargo tree --locked -p keystore-enclave --target "$target" -e normal \
  -f '{p} {f}' --prefix none)
nsm_line=$(grep -m1 '^keystore-nsm ' <<<"$enclave_tree" || true)
cms_line=$(grep -m1 '^keystore-cms ' <<<"$enclave_tree" || true)
if [ -z "$nsm_line" ] || [ -z "$cms_line" ]; then
  fail "cargo tree of keystore-enclave does not show keystore-nsm and keystore-cms; this check is looking at the wrong thing"
fi
if grep -qE '[ ,]mock(,|$)' <<<"$nsm_line"; then
  fail "the production enclave enables keystore-nsm feature \"mock\": $nsm_line"
fi
if grep -qE '[ ,]seal(,|$)' <<<"$cms_line"; then
  fail "the production enclave enables keystore-cms feature \"seal\": $cms_line"
fi

# (c)
if [ ! -f "$static_bin" ]; then
  echo "check-layout: $static_bin does not exist" >&2
  exit 1
fi
if grep -qaF -- "$marker" "$static_bin"; then
  fail "$static_bin contains the mock NSM marker \"$marker\""
fi

# (d)
if [ ! -f "$mock_bin" ]; then
  echo "check-layout: $mock_bin does not exist; build it with" >&2
  echo "  cargo build -p keystore-enclave --features mock --bin keystore-enclave" >&2
  exit 1
fi
if ! grep -qaF -- "$marker" "$mock_bin"; then
  fail "$mock_bin (built with --features mock) lacks the marker \"$marker\", so check (c) proves nothing"
fi

# (e)
pki=$(mktemp -d "${TMPDIR:-/tmp}/check-layout.XXXXXX")
trap 'rm -rf "$pki"' EXIT
# A binary that accepts the mock would start serving: bound it.
if out=$(timeout 60 "$static_bin" --nsm mock --mock-pki "$pki/pki" --listen "unix://$pki/s" 2>&1); then
  fail "$static_bin accepted --nsm mock"
elif ! grep -q 'this build has no mock NSM' <<<"$out"; then
  fail "$static_bin refused --nsm mock without saying why: $out"
fi

# (f)
accepting=$(grep -rlF --include='*.rs' '.accept()' shared/src enclave/src host-proxy/src \
  nsm/src cms/src tests/src | sort | tr '\n' ' ')
if [ "$accepting" != "shared/src/endpoint.rs shared/src/serve.rs " ]; then
  fail "production code accepts connections outside shared::serve: $accepting"
fi
if [ "$(grep -cF '.accept()' shared/src/serve.rs)" -ne 1 ]; then
  fail "shared/src/serve.rs should call accept() in exactly one place"
fi

# (g)
if yaml=$(grep -E '^(serde_norway|serde_yaml|serde_yaml_ng|unsafe-libyaml|yaml-rust)' <<<"$enclave_tree"); then
  fail "the production enclave links a YAML parser: $yaml"
fi

if [ "$failed" -ne 0 ]; then
  exit 1
fi
echo "check-layout: ok (no mock NSM or sealer in $static_bin; marker found in $mock_bin)"
