#!/usr/bin/env bash
# Side-by-side benchmarks on this one machine (DESIGN §7): the keystore
# against the tools people know (redis, socat, wrk), every ratio taken
# against its peer measured in the same run, medians of --runs runs.
# Starts every server it needs and stops each by its PID on exit.
#
#   scripts/bench.sh [--quick] [--runs N] [--duration SECONDS] [--out FILE] [--bin DIR]
#
# --quick: one short run of every case with small sizes (checks the script
#          works; its numbers mean nothing).
# --duration: seconds per load case (default 10; 1 with --quick).
# BENCH_ENCLAVE_FLAGS: extra flags for every enclave started (word-split),
#          e.g. "--worker-threads 1" to compare runtimes.
# --bin:   use binaries built earlier (keystore-enclave with feature `mock`,
#          keystore-host, mock-kms, loadgen) instead of release builds.
# Without --bin every binary it runs (enclave, keystore-host, the KMS
# emulator, loadgen) is a release build (lto, codegen-units = 1), made here.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=5 quick=0 out=BENCHMARKS.md bin='' duration=''
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1; runs=1 ;;
    --runs) runs=$2; shift ;;
    --duration) duration=$2; shift ;;
    --out) out=$2; shift ;;
    --bin) bin=$2; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
case $runs in ''|*[!0-9]*|0) echo "bench: --runs needs a positive number" >&2; exit 2 ;; esac

if [ "$quick" -eq 1 ]; then
  dur=1 warm=0.2 many=50 pv_many=50 gib=$((64 * 1024 * 1024)) burst=200 refresh_dur=2 keygens=1 opens=5 bits=(2048)
  redis_n=5000
else
  dur=10 warm=1 many=10000 pv_many=${BENCH_PV_SECRETS:-500} gib=$((1024 * 1024 * 1024)) burst=1000 refresh_dur=20 keygens=5 opens=300
  bits=(2048 3072 4096) redis_n=400000
fi
case $duration in '') ;; *[!0-9]*|0) echo "bench: --duration needs a positive number of seconds" >&2; exit 2 ;; *) dur=$duration ;; esac
read -r -a enclave_flags <<< "${BENCH_ENCLAVE_FLAGS:-}"
conns=64

say() { printf '\n==> %s\n' "$*" >&2; }

# Tools: Debian's redis (redis-benchmark), socat, wrk, and what the script
# itself uses.
need=(redis-server:redis-server redis-benchmark:redis-tools socat:socat wrk:wrk jq:jq curl:curl python3:python3)
missing=()
for pair in "${need[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -z "$bin" ]; then
  say "release builds"
  # The enclave with the mock NSM, built on its own (see scripts/demo.sh).
  cargo build --locked --release -p keystore-enclave --bins --features mock
  cargo build --locked --release -p keystore-host -p keystore-tests --bins
  bin=${CARGO_TARGET_DIR:-target}/release
  built="release builds made by this script (\`cargo build --release\`: lto, codegen-units = 1) of every binary: enclave, keystore-host, mock-kms, loadgen"
else
  built="given with \`--bin\` (not built by this script; release or not as given)"
fi
for b in keystore-enclave keystore-host mock-kms loadgen; do
  [ -x "$bin/$b" ] || { echo "bench: $bin/$b is missing" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/nitro-keystore-bench.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# kms_policy, start_kms_emulator (shared with scripts/demo.sh).
. scripts/lib.sh

# stop PID: stops one server this script started and forgets it.
stop() {
  local pid=$1 keep=()
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for p in "${pids[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "bench: $what did not come up" >&2
      return 1
    fi
    sleep 0.05
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# Results: one "metric value" line per measurement; medians at the end.
results=$work/results
: > "$results"
note() {
  case $2 in
    ''|null|*[!0-9.e+-]*) echo "bench: $1 measured nothing (\"$2\")" >&2; exit 1 ;;
  esac
  echo "$1 $2" >> "$results"
  echo "  $1 = $2" >&2
}
median() {
  awk -v m="$1" '$1 == m { print $2 }' "$results" | sort -g \
    | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.4g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.3f", a / b }'; }

export AWS_ACCESS_KEY_ID=AKIADEMODEMODEMO0001
export AWS_SECRET_ACCESS_KEY=demo-secret-access-key
export AWS_REGION=us-east-1
unset AWS_SESSION_TOKEN AWS_PROFILE AWS_DEFAULT_REGION

say "KMS emulator and key policy"
kms_policy "$bin" "$work" bench
start_kms_emulator "$bin" "$work" || exit 1
kms_admin() { curl -sS --cacert "$work/kms-tls/ca.pem" -X "$1" "$kms_url/__admin/calls"; }

# make_env FILE COUNT: COUNT secrets of 100 bytes each.
make_env() {
  python3 - "$1" "$2" <<'PY'
import sys, secrets
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(f"S_{i:05d}={secrets.token_hex(50)}\n")
PY
}
encrypt() { # encrypt FILE MODE-FLAG
  "$bin/keystore-host" encrypt --key-id "$key_id" "$2" --region us-east-1 \
    --endpoint-url "$kms_url" --ca-bundle "$work/kms-tls/ca.pem" "$1" > /dev/null
}

say "secrets files: 100 values for Get, $pv_many per-value, $many with a file key"
make_env "$work/get.env" 100
encrypt "$work/get.env" --file-key
make_env "$work/fk.env" "$many"
encrypt "$work/fk.env" --file-key
make_env "$work/pv.env" "$pv_many"
t0=$(now)
encrypt "$work/pv.env" --per-value-kms
echo "  per-value encrypt of $pv_many values: $(elapsed "$t0" "$(now)") s" >&2

# start_stack DIR SECRETS [enclave flags...]: enclave + host proxy (loader,
# forwarder, credentials, agent on a unix socket and HTTP). Sets
# enclave_pid, proxy_pid, agent_port, keygen_s (enclave start to serving)
# and ready_s (proxy start to the set loaded).
start_stack() {
  local d=$1 secrets=$2; shift 2
  mkdir -p "$d/tokens"
  rm -f "$d/audit.jsonl"*
  printf 'token = bench-token-0123456789abcdef\nuid = 0\n' > "$d/tokens/bench"
  chmod 0640 "$d/tokens/bench"
  printf 'bench-token-0123456789abcdef\n' > "$d/token"
  local t0
  t0=$(now)
  "$bin/keystore-enclave" --nsm mock --mock-pki "$work/pki" --recipient-bits 2048 \
    --listen "unix://$d/enclave.sock" --load-listen "unix://$d/load.sock" \
    --region us-east-1 --kms-key-arn "$key_id" --kms-host localhost \
    --kms-proxy "unix://$d/kms.sock" --credentials "unix://$d/credentials.sock" \
    --kms-ca "$work/kms-tls/ca.pem" --log-level warn "${enclave_flags[@]}" "$@" > "$d/enclave.out" 2> "$d/enclave.log" &
  enclave_pid=$!
  pids+=("$enclave_pid")
  wait_for 120 "the enclave" test -s "$d/enclave.out" || { cat "$d/enclave.log" >&2; exit 1; }
  keygen_s=$(elapsed "$t0" "$(now)")
  agent_port=$(free_port)
  t0=$(now)
  "$bin/keystore-host" --enclave "unix://$d/enclave.sock" proxy --region us-east-1 \
    --forward "unix://$d/kms.sock=127.0.0.1:$kms_port" \
    --credentials-listen "unix://$d/credentials.sock" \
    --load-to "unix://$d/load.sock" --secrets "$secrets" \
    --agent-socket "$d/agent.sock" --agent-http "tcp://127.0.0.1:$agent_port" \
    --tokens "$d/tokens" --audit-log "$d/audit.jsonl" --no-metrics 2> "$d/proxy.log" &
  proxy_pid=$!
  pids+=("$proxy_pid")
  ready() { "$bin/keystore-host" --enclave "unix://$d/enclave.sock" status --json | jq -e '.ready' >/dev/null; }
  wait_for 300 "the first load" ready || { tail -20 "$d/proxy.log" "$d/enclave.log" >&2; exit 1; }
  ready_s=$(elapsed "$t0" "$(now)")
  wait_for 30 "the agent" test -S "$d/agent.sock"
  stack_dir=$d
}
stop_stack() { stop "$proxy_pid"; stop "$enclave_pid"; stack_dir=''; }
stack_dir=''

# Whether the daemon has drained (nearly) every audit record the enclave
# buffered; a few are the Status polls of this check itself.
drained() {
  "$bin/keystore-host" --enclave "unix://$stack_dir/enclave.sock" status --json |
    jq -e '(.audit.buffered // 0) < 100' >/dev/null
}

# CPU time (user + system, clock ticks) the processes in cpu_pids used so
# far: on a machine shared with other work, CPU per request is the figure
# that does not depend on how much of the CPU the server got.
cpu_pids=()
clk_tck=$(getconf CLK_TCK)
cpu_ticks() {
  local total=0 pid
  for pid in "${cpu_pids[@]}"; do
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
  done
  echo "$total"
}
cpu_us() { # cpu_us TICKS REQUESTS: CPU µs per request
  awk -v t="$1" -v n="$2" -v hz="$clk_tck" 'BEGIN { if (n + 0 == 0) print "n/a"; else printf "%.1f", t * 1e6 / hz / n }'
}

# CPU seconds (user + system) of this script's finished children so far:
# the client's cost (loadgen, redis-benchmark), since the client shares the
# same cores as the server. `times` runs in this shell, not a subshell
# (a subshell starts with no children's time).
client_cpu() {
  times > "$work/times"
  awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, p, /[ms]/); t += p[1] * 60 + p[2] } printf "%.3f", t }' "$work/times"
}

loadgen_run() { # loadgen_run PREFIX TARGET [flags...]: notes PREFIX.rps, .p99_us, .errors
  local prefix=$1 target=$2 json before client0 client1; shift 2
  before=$(cpu_ticks)
  client_cpu > "$work/client0"
  json=$("$bin/loadgen" run --target "$target" --connections "$conns" --duration "${dur}s" \
    --warmup "${warm}s" --json "$@")
  client_cpu > "$work/client1"
  client0=$(cat "$work/client0") client1=$(cat "$work/client1")
  # Every request is an audit record the daemon drains and writes: wait
  # for that before reading the CPU counters, so the drain counts against
  # the case whose requests made the records (not the next case).
  if [ -n "$stack_dir" ]; then
    wait_for 300 "the audit drain" drained || true
  fi
  note "$prefix.client_cpu_us" "$(jq -r --arg w "$warm" --arg c "$(elapsed "$client0" "$client1")" \
    '(($c | tonumber) * 1e6 / (.requests_per_s * (.duration_s + ($w | tonumber)))) * 10 | floor / 10' <<<"$json")"
  if [ ${#cpu_pids[@]} -gt 0 ]; then
    # Requests over the warm-up too, at the measured rate.
    note "$prefix.cpu_us" "$(cpu_us $(($(cpu_ticks) - before)) "$(jq -r --arg w "$warm" '.requests_per_s * (.duration_s + ($w | tonumber))' <<<"$json")")"
  fi
  note "$prefix.rps" "$(jq -r '.requests_per_s | floor' <<<"$json")"
  note "$prefix.p50_us" "$(jq -r '.latency_us.p50' <<<"$json")"
  note "$prefix.p99_us" "$(jq -r '.latency_us.p99' <<<"$json")"
  note "$prefix.p999_us" "$(jq -r '.latency_us.p999' <<<"$json")"
  note "$prefix.errors" "$(jq -r '[.errors[]] | add // 0' <<<"$json")"
}

names=()
for i in $(seq 0 9); do names+=(--name "S_$(printf %05d "$i")"); done

# Machine, once.
{
  echo "- CPU: $(lscpu | awk -F: '/Model name/ { gsub(/^ +/, "", $2); print $2; exit }'), $(nproc) CPUs online"
  echo "- kernel: $(uname -srm)"
  echo "- memory: $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "- redis: $(redis-server --version | cut -d' ' -f3), socat: $(socat -V 2>/dev/null | awk '/socat version/ { print $3; exit }'), wrk: $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }')"
  echo "- rustc: $(rustc --version 2>/dev/null || echo unknown); binaries: $bin, $built"
} > "$work/machine"

for run in $(seq 1 "$runs"); do
  say "run $run of $runs"

  # 1. Get: secret port, agent (unix, HTTP) vs redis GET on a unix socket.
  say "1. Get, $conns connections, 100-byte values"
  start_stack "$work/get" "$work/get.env"
  # Server CPU is the enclave's and the daemon's in every case: the daemon
  # drains the audit record of each request, whichever path it took.
  cpu_pids=("$enclave_pid" "$proxy_pid")
  loadgen_run secret "unix://$work/get/enclave.sock" "${names[@]}"
  loadgen_run agent "unix://$work/get/agent.sock" "${names[@]}"
  loadgen_run http "http://127.0.0.1:$agent_port" --token-file "$work/get/token" "${names[@]}"
  loadgen_run secret_d16 "unix://$work/get/enclave.sock" --depth 16 "${names[@]}"
  cpu_pids=()
  wrk_out=$(wrk -t2 -c"$conns" -d"${dur}s" --latency \
    -H "X-Aws-Parameters-Secrets-Token: bench-token-0123456789abcdef" \
    "http://127.0.0.1:$agent_port/secretsmanager/get?secretId=S_00001")
  note wrk.rps "$(awk '/Requests\/sec/ { printf "%d", $2 }' <<<"$wrk_out")"
  note wrk.p99_us "$(awk '$1 == "99%" { v = $2; if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1000; else m = 1000000; sub(/[a-z]+$/, "", v); printf "%d", v * m }' <<<"$wrk_out")"
  # The steady-state peer of case 4, on the same stack (its key and
  # document are not refreshed within the run: the default is every 4 min).
  saved=$dur
  dur=$refresh_dur
  loadgen_run steady "unix://$work/get/enclave.sock" "${names[@]}"
  dur=$saved
  note steady.refreshes "$("$bin/keystore-host" --enclave "unix://$work/get/enclave.sock" status --json | jq -r '.refresh_count')"
  stop_stack

  # 5. `audit verify` on the log the daemon drained from this stack's
  # enclave (every Get above is a record; checkpoints signed by the mock
  # NSM's root): a real chained log, not a generated one.
  say "5. audit verify on the case 1 log"
  t0=$(now)
  verify_json=$("$bin/keystore-host" audit verify --root "$work/pki/root.pem" --json \
    "$work/get/audit.jsonl" 2> "$work/verify.log") || true
  verify_s=$(elapsed "$t0" "$(now)")
  if [ "$(jq -r '.valid' <<<"$verify_json" 2>/dev/null)" != true ]; then
    echo "bench: audit verify did not pass: $verify_json" >&2
    cat "$work/verify.log" >&2
    exit 1
  fi
  note audit.records "$(jq -r '.summary.records' <<<"$verify_json")"
  note audit.checkpoints "$(jq -r '.summary.checkpoints' <<<"$verify_json")"
  note audit.verify_s "$verify_s"
  note audit.verify_rps "$(awk -v n="$(jq -r '.summary.records' <<<"$verify_json")" -v s="$verify_s" 'BEGIN { printf "%d", n / s }')"
  note audit.log_mib "$(du -m "$work/get/audit.jsonl" | cut -f1)"

  # 5. Get without the audit trail: the same enclave binary told to record
  # no requests (`--bench-without-audit`, a hidden flag of `mock` builds
  # only), against case 1's secret port with it.
  say "5. Get without the audit trail"
  start_stack "$work/noaudit" "$work/get.env" --bench-without-audit
  cpu_pids=("$enclave_pid" "$proxy_pid")
  loadgen_run noaudit "unix://$work/noaudit/enclave.sock" "${names[@]}"
  cpu_pids=()
  stop_stack
  note ratio.audit_vs_none_rps "$(ratio "$(awk '$1 == "secret.rps" { v = $2 } END { print v }' "$results")" "$(awk '$1 == "noaudit.rps" { v = $2 } END { print v }' "$results")")"
  note ratio.audit_vs_none_cpu "$(ratio "$(awk '$1 == "secret.cpu_us" { v = $2 } END { print v }' "$results")" "$(awk '$1 == "noaudit.cpu_us" { v = $2 } END { print v }' "$results")")"
  redis-server --port 0 --unixsocket "$work/redis.sock" --save '' --appendonly no \
    > "$work/redis.log" 2>&1 &
  redis_pid=$!
  pids+=("$redis_pid")
  wait_for 30 "redis" test -S "$work/redis.sock"
  cpu_pids=("$redis_pid")
  before=$(cpu_ticks)
  client_cpu > "$work/client0"
  redis-benchmark -s "$work/redis.sock" -c "$conns" -n "$redis_n" -d 100 -t set,get --csv > "$work/redis.csv"
  client_cpu > "$work/client1"
  redis_csv=$(cat "$work/redis.csv")
  note redis.cpu_us "$(cpu_us $(($(cpu_ticks) - before)) $((2 * redis_n)))"
  note redis.client_cpu_us "$(awk -v a="$(cat "$work/client0")" -v b="$(cat "$work/client1")" -v n=$((2 * redis_n)) 'BEGIN { printf "%.1f", (b - a) * 1e6 / n }')"
  cpu_pids=()
  stop "$redis_pid"
  get_row=$(grep '^"GET"' <<<"$redis_csv" | tr -d '"')
  note redis.rps "$(cut -d, -f2 <<<"$get_row" | awk '{ printf "%d", $1 }')"
  note redis.p99_us "$(cut -d, -f7 <<<"$get_row" | awk '{ printf "%d", $1 * 1000 }')"
  note ratio.secret_vs_redis "$(ratio "$(awk '$1 == "secret.rps" { v = $2 } END { print v }' "$results")" "$(awk '$1 == "redis.rps" { v = $2 } END { print v }' "$results")")"
  note ratio.agent_vs_redis "$(ratio "$(awk '$1 == "agent.rps" { v = $2 } END { print v }' "$results")" "$(awk '$1 == "redis.rps" { v = $2 } END { print v }' "$results")")"
  note ratio.http_vs_wrk_rps "$(ratio "$(awk '$1 == "http.rps" { v = $2 } END { print v }' "$results")" "$(awk '$1 == "wrk.rps" { v = $2 } END { print v }' "$results")")"

  # 2. Forwarder vs socat on the same path: sender -> relay -> sink.
  say "2. forwarder: $((gib / 1048576)) MiB, and $burst connections at once"
  sink_port=$(free_port) fwd_port=$(free_port) socat_port=$(free_port) echo_port=$(free_port) fwd_echo_port=$(free_port) socat_echo_port=$(free_port)
  socat -u -b 65536 "TCP-LISTEN:$sink_port,reuseaddr,fork" OPEN:/dev/null &
  sink_pid=$!
  pids+=("$sink_pid")
  "$bin/loadgen" echo-server --listen "tcp://127.0.0.1:$echo_port" 2> "$work/echo.log" &
  echo_pid=$!
  pids+=("$echo_pid")
  "$bin/keystore-host" proxy --region us-east-1 --no-agent --max-connections 2048 \
    --forward "tcp://127.0.0.1:$fwd_port=127.0.0.1:$sink_port" \
    --forward "tcp://127.0.0.1:$fwd_echo_port=127.0.0.1:$echo_port" \
    --credentials-listen "unix://$work/fwd-credentials.sock" \
    --load-to "unix://$work/nowhere.sock" --no-audit-log --no-metrics 2> "$work/forwarder.log" &
  fwd_pid=$!
  pids+=("$fwd_pid")
  socat -b 65536 "TCP-LISTEN:$socat_port,reuseaddr,fork" "TCP:127.0.0.1:$sink_port" &
  socat_pid=$!
  pids+=("$socat_pid")
  # The burst's peer: socat relaying to the same echo server, with the same
  # accept queue as the forwarder (socat's default backlog is 5).
  socat "TCP-LISTEN:$socat_echo_port,reuseaddr,fork,backlog=4096" "TCP:127.0.0.1:$echo_port" &
  socat_echo_pid=$!
  pids+=("$socat_echo_pid")
  port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
  for p in "$sink_port" "$fwd_port" "$socat_port" "$echo_port" "$fwd_echo_port" "$socat_echo_port"; do
    wait_for 30 "port $p" port_open "$p"
  done
  push() { # push PORT: seconds to send $gib bytes through it
    local t0
    t0=$(now)
    head -c "$gib" /dev/zero | socat -u -b 65536 STDIN "TCP:127.0.0.1:$1"
    elapsed "$t0" "$(now)"
  }
  fwd_s=$(push "$fwd_port")
  socat_s=$(push "$socat_port")
  note forward.mib_s "$(awk -v b="$gib" -v s="$fwd_s" 'BEGIN { printf "%d", b / 1048576 / s }')"
  note socat.mib_s "$(awk -v b="$gib" -v s="$socat_s" 'BEGIN { printf "%d", b / 1048576 / s }')"
  note ratio.forward_vs_socat "$(ratio "$socat_s" "$fwd_s")"
  one=$("$bin/loadgen" echo --target "tcp://127.0.0.1:$fwd_echo_port" --connections 1 --rounds 200 --json)
  many_json=$("$bin/loadgen" echo --target "tcp://127.0.0.1:$fwd_echo_port" --connections "$burst" --json)
  note burst.completed "$(jq -r '.completed' <<<"$many_json")"
  note burst.p99_us "$(jq -r '.latency_us.p99' <<<"$many_json")"
  note one.p99_us "$(jq -r '.latency_us.p99' <<<"$one")"
  note ratio.burst_vs_one_p99 "$(ratio "$(jq -r '.latency_us.p99' <<<"$many_json")" "$(jq -r '.latency_us.p99' <<<"$one")")"
  socat_many=$("$bin/loadgen" echo --target "tcp://127.0.0.1:$socat_echo_port" --connections "$burst" --json)
  note socat_burst.completed "$(jq -r '.completed' <<<"$socat_many")"
  note socat_burst.p99_us "$(jq -r '.latency_us.p99' <<<"$socat_many")"
  note ratio.burst_vs_socat_p99 "$(ratio "$(jq -r '.latency_us.p99' <<<"$many_json")" "$(jq -r '.latency_us.p99' <<<"$socat_many")")"
  for p in "$socat_echo_pid" "$socat_pid" "$fwd_pid" "$echo_pid" "$sink_pid"; do stop "$p"; done

  # 3 and 6. Loading $many secrets: per-value envelopes vs one file key;
  # KMS calls counted by the emulator; the enclave's peak RSS.
  for kind in pv fk; do
    say "3. $kind secrets"
    kms_admin DELETE > /dev/null
    start_stack "$work/$kind" "$work/$kind.env"
    note "$kind.keygen_s" "$keygen_s"
    note "$kind.ready_s" "$ready_s"
    note "$kind.decrypts" "$(kms_admin GET | jq -r '.Decrypt.calls // 0')"
    note "$kind.vmhwm_kib" "$(awk '/VmHWM/ { print $2 }' "/proc/$enclave_pid/status")"
    stop_stack
  done

  # 4. Get p99 while the recipient key and document refresh every 3 s.
  say "4. Get p99 steady vs refreshing every 3 s"
  start_stack "$work/refresh" "$work/get.env" --refresh-after 3s
  saved=$dur
  dur=$refresh_dur
  loadgen_run refresh "unix://$work/refresh/enclave.sock" "${names[@]}"
  dur=$saved
  note refresh.refreshes "$("$bin/keystore-host" --enclave "unix://$work/refresh/enclave.sock" status --json | jq -r '.refresh_count')"
  stop_stack
  note ratio.refresh_vs_steady_p99 "$(ratio "$(awk '$1 == "refresh.p99_us" { v = $2 } END { print v }' "$results")" "$(awk '$1 == "steady.p99_us" { v = $2 } END { print v }' "$results")")"

  # 5. RSA key generation and cms::open.
  say "5. RSA key generation, cms::open"
  bits_flags=()
  for b in "${bits[@]}"; do bits_flags+=(--bits "$b"); done
  crypto=$("$bin/loadgen" crypto "${bits_flags[@]}" --keygens "$keygens" --opens "$opens" --json)
  for b in "${bits[@]}"; do
    note "rsa$b.keygen_ms" "$(jq -r ".[] | select(.bits == $b) | .keygen_ms_median | floor" <<<"$crypto")"
    note "rsa$b.open_us" "$(jq -r ".[] | select(.bits == $b) | .open_us_median | floor" <<<"$crypto")"
  done
done

m() { median "$1"; }
goal() { # goal VALUE OP LIMIT: met / MISSED
  awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
    if (v == "n/a") { print "n/a"; exit }
    ok = (op == ">=" ? v >= l : op == "<=" ? v <= l : op == "<" ? v < l : v == l)
    print (ok ? "met" : "**missed**") }'
}
kib_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ms() { awk -v u="$1" 'BEGIN { printf "%.3f", u / 1000 }'; }

mode="full: $runs runs, ${dur} s per load case, $((gib / 1048576)) MiB, $many file-key and $pv_many per-value secrets"
[ "$quick" -eq 1 ] && mode="QUICK (smoke run: 1 short run, small sizes; the numbers mean nothing)"
report=$work/report.md
{
  cat <<EOF
# Benchmarks

Generated by \`scripts/bench.sh\` on $(date -u +%Y-%m-%dT%H:%MZ) ($mode)${BENCH_ENCLAVE_FLAGS:+, enclave flags \`$BENCH_ENCLAVE_FLAGS\`}.
Every number is the median over the runs; every ratio is computed inside a run
against its peer measured in that same run, then the median taken.
The enclave runs with the mock NSM and 2048-bit recipient keys (production
default: 4096), the KMS emulator stands in for KMS, all on one machine.

## Machine

$(cat "$work/machine")

## 1. Get, $conns connections, 100-byte values (goal: ≥ 1.0× redis, p99 < 1 ms)

| path | requests/s | p50 ms | p99 ms | p99.9 ms | errors | vs redis |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
| secret port \`unix://\` (loadgen) | $(m secret.rps) | $(ms "$(m secret.p50_us)") | $(ms "$(m secret.p99_us)") | $(ms "$(m secret.p999_us)") | $(m secret.errors) | $(m ratio.secret_vs_redis)× ($(goal "$(m ratio.secret_vs_redis)" ">=" 1.0)) |
| agent unix socket (loadgen) | $(m agent.rps) | $(ms "$(m agent.p50_us)") | $(ms "$(m agent.p99_us)") | $(ms "$(m agent.p999_us)") | $(m agent.errors) | $(m ratio.agent_vs_redis)× ($(goal "$(m ratio.agent_vs_redis)" ">=" 1.0)) |
| secret port, pipelined depth 16 | $(m secret_d16.rps) | $(ms "$(m secret_d16.p50_us)") | $(ms "$(m secret_d16.p99_us)") | $(ms "$(m secret_d16.p999_us)") | $(m secret_d16.errors) | |
| redis GET, unix socket (redis-benchmark) | $(m redis.rps) | | $(ms "$(m redis.p99_us)") | | | 1× |
| agent HTTP (loadgen) | $(m http.rps) | $(ms "$(m http.p50_us)") | $(ms "$(m http.p99_us)") | $(ms "$(m http.p999_us)") | $(m http.errors) | |
| agent HTTP (wrk -t2) | $(m wrk.rps) | | $(ms "$(m wrk.p99_us)") | | | |

Server CPU per request (user + system time of the server processes over
the run and until the daemon has drained its audit records, divided by the
requests served; independent of how much of the shared CPU each server
got; the servers are the enclave and the daemon in every keystore case,
since the daemon drains and writes the audit record each request makes):
secret port $(m secret.cpu_us) µs, pipelined
$(m secret_d16.cpu_us) µs, agent unix $(m agent.cpu_us) µs,
agent HTTP $(m http.cpu_us) µs, redis (SET and GET)
$(m redis.cpu_us) µs. Client CPU per request (the client shares the same
cores): loadgen on the secret port $(m secret.client_cpu_us) µs, pipelined
$(m secret_d16.client_cpu_us) µs, agent $(m agent.client_cpu_us) µs,
HTTP $(m http.client_cpu_us) µs; redis-benchmark $(m redis.client_cpu_us) µs.

p99 < 1 ms: secret port $(goal "$(m secret.p99_us)" "<" 1000), agent $(goal "$(m agent.p99_us)" "<" 1000).

## 2. Forwarder (goal: ≥ 1.0× socat; $burst connections all complete, p99 ≤ 2× one connection)

| | result |
| --- | ---: |
| $((gib / 1048576)) MiB through \`keystore-host proxy --forward tcp→tcp\` | $(m forward.mib_s) MiB/s |
| the same through \`socat -b 65536\` | $(m socat.mib_s) MiB/s |
| forwarder vs socat | $(m ratio.forward_vs_socat)× ($(goal "$(m ratio.forward_vs_socat)" ">=" 1.0)) |
| $burst connections at once, one echo each: completed | $(m burst.completed) of $burst |
| their p99 | $(ms "$(m burst.p99_us)") ms |
| one connection, 200 echoes: p99 | $(ms "$(m one.p99_us)") ms |
| burst p99 / one-connection p99 | $(m ratio.burst_vs_one_p99)× ($(goal "$(m ratio.burst_vs_one_p99)" "<=" 2.0)) |
| the same burst through \`socat\` (fork, backlog 4096): completed, p99 | $(m socat_burst.completed) of $burst, $(ms "$(m socat_burst.p99_us)") ms |
| forwarder burst p99 / socat burst p99 | $(m ratio.burst_vs_socat_p99)× |

## 3. Loading secrets (goal for $many with a file key: 1 KMS call, ready < 1.5 s + one key generation)

Per-value envelopes cost one KMS \`Decrypt\` each, so that column loads
$pv_many secrets (\`BENCH_PV_SECRETS\`: each is one emulator round trip, see the analysis),
the file-key column $many.

| | per-value \`ENC[v1:kms]\`, $pv_many secrets | file key \`ENC[v1:fk]\`, $many secrets |
| --- | ---: | ---: |
| KMS Decrypt calls (emulator's count) | $(m pv.decrypts) | $(m fk.decrypts) ($(goal "$(m fk.decrypts)" "==" 1)) |
| enclave start to listening | $(m pv.keygen_s) s | $(m fk.keygen_s) s |
| daemon start to ready (key generation, document, read, Decrypt, load) | $(m pv.ready_s) s | $(m fk.ready_s) s ($(goal "$(m fk.ready_s)" "<" 1.5)) |
| per-value Decrypts per second | $(awk -v n="$(m pv.decrypts)" -v t="$(m pv.ready_s)" 'BEGIN { printf "%.1f", n / t }') | |

## 4. Get p99 while the recipient key and document refresh every 3 s (goal ≤ 1.2× steady)

| | requests/s | p99 ms | refreshes seen |
| --- | ---: | ---: | ---: |
| steady (the case 1 stack) | $(m steady.rps) | $(ms "$(m steady.p99_us)") | $(m steady.refreshes) |
| \`--refresh-after 3s\` | $(m refresh.rps) | $(ms "$(m refresh.p99_us)") | $(m refresh.refreshes) |
| ratio | | $(m ratio.refresh_vs_steady_p99)× ($(goal "$(m ratio.refresh_vs_steady_p99)" "<=" 1.2)) | |

## 5. RSA, CMS (one thread, the binaries above) and the audit trail

| bits | key generation, median ms | \`cms::open\`, median µs per call |
| ---: | ---: | ---: |
EOF
  for b in "${bits[@]}"; do
    echo "| $b | $(m "rsa$b.keygen_ms") | $(m "rsa$b.open_us") |"
  done
  cat <<EOF

| audit trail | result |
| --- | ---: |
| \`keystore-host audit verify\` on case 1's log ($(m audit.records) records, $(m audit.checkpoints) checkpoints, $(m audit.log_mib) MiB) | $(m audit.verify_rps) records/s ($(m audit.verify_s) s) |
| secret port \`Get\`, audited (case 1) | $(m secret.rps) requests/s, $(m secret.cpu_us) µs server CPU each |
| the same, \`--bench-without-audit\` | $(m noaudit.rps) requests/s, $(m noaudit.cpu_us) µs server CPU each |
| audited / not audited | $(m ratio.audit_vs_none_rps)× throughput, $(m ratio.audit_vs_none_cpu)× CPU per request |

## 6. Enclave peak RSS (goal < 32 MiB with 10,000 secrets)

| | VmHWM |
| --- | ---: |
| per-value envelopes, $pv_many secrets | $(kib_mib "$(m pv.vmhwm_kib)") MiB |
| file key, $many secrets | $(kib_mib "$(m fk.vmhwm_kib)") MiB ($(goal "$(kib_mib "$(m fk.vmhwm_kib)")" "<" 32)) |

## Commands

\`\`\`
loadgen run --target unix://…/enclave.sock --connections $conns --duration ${dur}s --name S_00000 … (secret port)
loadgen run --target unix://…/agent.sock … (agent), --target http://127.0.0.1:PORT --token-file … (agent HTTP)
wrk -t2 -c$conns -d${dur}s --latency -H 'X-Aws-Parameters-Secrets-Token: …' http://127.0.0.1:PORT/secretsmanager/get?secretId=S_00001
redis-server --port 0 --unixsocket …/redis.sock --save '' --appendonly no
redis-benchmark -s …/redis.sock -c $conns -n $redis_n -d 100 -t set,get --csv
head -c $gib /dev/zero | socat -u -b 65536 STDIN TCP:127.0.0.1:PORT   (PORT = forwarder, then socat relay)
keystore-host proxy --forward tcp://127.0.0.1:F=127.0.0.1:SINK --max-connections 2048 …
socat -b 65536 TCP-LISTEN:R,reuseaddr,fork TCP:127.0.0.1:SINK; sink: socat -u -b 65536 TCP-LISTEN:SINK,fork OPEN:/dev/null
loadgen echo --target tcp://127.0.0.1:F2 --connections $burst    vs    --connections 1 --rounds 200
socat TCP-LISTEN:S2,reuseaddr,fork,backlog=4096 TCP:127.0.0.1:ECHO; loadgen echo --target tcp://127.0.0.1:S2 --connections $burst
keystore-enclave --nsm mock --recipient-bits 2048 [--refresh-after 3s | --bench-without-audit] …; keystore-host proxy --secrets FILE …
keystore-host audit verify --root …/pki/root.pem --json …/get/audit.jsonl
loadgen crypto --bits … --keygens $keygens --opens $opens
\`\`\`

## All medians

| metric | median | values |
| --- | ---: | --- |
EOF
  awk '!seen[$1]++ { print $1 }' "$results" | while read -r metric; do
    echo "| $metric | $(m "$metric") | $(awk -v k="$metric" '$1 == k { printf "%s ", $2 }' "$results")|"
  done
} > "$report"

# Hand-written analysis below the marker in an existing report is kept.
marker='<!-- analysis: kept by scripts/bench.sh -->'
if [ -f "$out" ] && grep -qF "$marker" "$out"; then
  # (awk's index, not a sed address: the marker holds slashes)
  { echo; awk -v m="$marker" 'index($0, m) { on = 1 } on' "$out"; } >> "$report"
fi
cp "$report" "$out"
say "wrote $out"
