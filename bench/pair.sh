#!/usr/bin/env bash
# Outrider sidecar-pair benchmark (issue 2 "Measure"; with --compare, issue 9's side-by-side).
#
# One command: builds release, installs wrk/nginx (and haproxy, gnuplot for --compare) when
# missing, starts an nginx backend (one worker, keep-alive, `return 200 "ok"` at / and a
# 16 KiB static file at /16k.bin) on loopback, mints certs, starts an Outrider caller+callee
# pair in front of it, pins every server to one core and the load generators to another, and
# measures in interleaved rounds (A B A B ...):
#   - max throughput: wrk, 64 connections, 2-byte and 16 KiB bodies
#   - latency: bench/loadgen at a fixed 2,000 req/s over 16 connections, open loop, measured
#     from the intended send time (coordinated omission corrected)
#   - per proxy: CPU seconds per 10,000 requests (utime+stime around the 2-byte wrk run and
#     around the fixed-rate run) and peak RSS (VmHWM)
# then prints a table (median, min-max, ratios paired by round), writes JSON under
# bench/results/ and, when gnuplot is installed, a PNG latency-percentile plot.
#
#   bench/pair.sh                 direct vs Outrider pair (HTTP/1.1)
#   bench/pair.sh --compare       + nginx and HAProxy mTLS sidecar pairs (= --grpc --sweep --idle)
#   bench/pair.sh --quick         2 rounds of 2 s (for development)
#   options: --rounds N  --seconds S  --rate R  --no-build  --keep (keep configs and logs)
#            --grpc     gRPC unary through an Outrider pair vs direct (loadgen serve backend)
#            --sweep    wrk throughput at 16, 64, 256, 1,024 connections (direct, Outrider)
#            --idle     RSS added by 1,000 idle keep-alive connections to each caller sidecar
#            --nice N   run servers and load generators at this nice level (e.g. -10 on a
#                       shared machine, so other jobs disturb the measurement less; needs root)
#   env: CARGO_TARGET_DIR, BENCH_PORT_BASE (default 21100), BENCH_SERVER_CPUS / BENCH_LOAD_CPUS
#
# Traffic stays on 127.0.0.1. Everything started here is killed on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
RESULTS="$ROOT/bench/results"

ROUNDS=3
SECONDS_EACH=5
LAT_SECONDS=""
RATE=2000
COMPARE=0
GRPC=0
BUILD=1
KEEP=0
NICE=0
SWEEP=0
IDLE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --compare) COMPARE=1; GRPC=1; SWEEP=1; IDLE=1 ;;
        --sweep) SWEEP=1 ;;
        --idle) IDLE=1 ;;
        --grpc) GRPC=1 ;;
        --quick) ROUNDS=2; SECONDS_EACH=2 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --seconds) SECONDS_EACH="$2"; shift ;;
        --rate) RATE="$2"; shift ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --nice) NICE="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "pair.sh: unknown option $1" >&2; exit 1 ;;
    esac
    shift
done
LAT_SECONDS="${LAT_SECONDS:-$SECONDS_EACH}"
[[ "$ROUNDS" =~ ^[1-9][0-9]?$ ]] || { echo "pair.sh: --rounds must be 1-99" >&2; exit 1; }
[[ "$SECONDS_EACH" =~ ^[1-9][0-9]?$ ]] || { echo "pair.sh: --seconds must be 1-99" >&2; exit 1; }
[[ "$NICE" =~ ^-?[0-9]+$ && "$NICE" -ge -20 && "$NICE" -le 19 ]] || { echo "pair.sh: --nice must be -20..19" >&2; exit 1; }

log() { printf '[pair %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- tools
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v nginx >/dev/null || need_pkgs+=(nginx)
command -v curl >/dev/null || need_pkgs+=(curl)
command -v python3 >/dev/null || need_pkgs+=(python3)
command -v taskset >/dev/null || need_pkgs+=(util-linux)
if [[ $COMPARE == 1 ]]; then
    command -v haproxy >/dev/null || need_pkgs+=(haproxy)
    command -v gnuplot >/dev/null || need_pkgs+=(gnuplot-nox)
fi
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    log "installing ${need_pkgs[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "pair.sh: need root to apt-get install ${need_pkgs[*]} (or install them first)" >&2
        exit 1
    fi
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
HAPROXY="$(command -v haproxy || echo /usr/sbin/haproxy)"

# ---------------------------------------------------------------- build
if [[ $BUILD == 1 ]]; then
    log "cargo build --release -p outrider, then -p loadgen (target $TARGET_DIR)"
    # Separately: built together, loadgen's dependencies would unify extra features into the
    # sidecar, and the binary measured would not be the one `cargo build --release` gives.
    (cd "$ROOT" && cargo build --release -q -p outrider && cargo build --release -q -p loadgen)
fi
OUTRIDER="$TARGET_DIR/release/outrider"
LOADGEN="$TARGET_DIR/release/loadgen"
for b in "$OUTRIDER" "$LOADGEN"; do
    [[ -x "$b" ]] || { echo "pair.sh: $b missing (run without --no-build)" >&2; exit 1; }
done
# A stale code layout costs each sidecar MiBs of RSS (bench/link-order.sh); say so, and record it.
LINK_ORDER="$("$ROOT/bench/link-order.sh" --check "$OUTRIDER" 2>&1)" || true
log "$LINK_ORDER"

# ---------------------------------------------------------------- cores
NCPU="$(nproc)"
MODEL="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
if [[ -n "${BENCH_SERVER_CPUS:-}" || -n "${BENCH_LOAD_CPUS:-}" ]]; then
    SERVER_CPUS="${BENCH_SERVER_CPUS:-0}"
    LOAD_CPUS="${BENCH_LOAD_CPUS:-1}"
elif [[ "$NCPU" -ge 2 ]]; then
    SERVER_CPUS=0
    LOAD_CPUS=1
else
    SERVER_CPUS=""
    LOAD_CPUS=""
    log "WARNING: only $NCPU CPU: servers and load generator share it; ratios mean little"
fi
# taskset and nice exec their command, so a background job's $! is the server itself.
SERVER_PREFIX=() LOAD_PREFIX=()
[[ -n "$SERVER_CPUS" ]] && SERVER_PREFIX=(taskset -c "$SERVER_CPUS")
[[ -n "$LOAD_CPUS" ]] && LOAD_PREFIX=(taskset -c "$LOAD_CPUS")
if [[ "$NICE" != 0 ]]; then
    SERVER_PREFIX+=(nice -n "$NICE")
    LOAD_PREFIX+=(nice -n "$NICE")
fi
on_load() { "${LOAD_PREFIX[@]}" "$@"; }
LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)"
log "$NCPU CPUs ($MODEL); servers on CPU ${SERVER_CPUS:-any}, load on CPU ${LOAD_CPUS:-any}; nice $NICE; load average $LOADAVG"

# ---------------------------------------------------------------- ports
BASE="${BENCH_PORT_BASE:-21100}"
P_NGINX=$((BASE + 0))
P_ECHO=$((BASE + 1))
P_WEB_OUT=$((BASE + 10)) P_WEB_IN=$((BASE + 11)) P_WEB_ADMIN=$((BASE + 12))
P_BE_OUT=$((BASE + 13)) P_BE_IN=$((BASE + 14)) P_BE_ADMIN=$((BASE + 15))
P_EC_OUT=$((BASE + 16)) P_EC_IN=$((BASE + 17)) P_EC_ADMIN=$((BASE + 18))
P_NGX_OUT=$((BASE + 20)) P_NGX_IN=$((BASE + 21))
P_HAP_OUT=$((BASE + 30)) P_HAP_IN=$((BASE + 31))
P_HAP2_OUT=$((BASE + 32)) P_HAP2_IN=$((BASE + 33))
for p in "$P_NGINX" "$P_ECHO" "$P_WEB_OUT" "$P_WEB_IN" "$P_WEB_ADMIN" "$P_BE_OUT" "$P_BE_IN" \
    "$P_BE_ADMIN" "$P_EC_OUT" "$P_EC_IN" "$P_EC_ADMIN" "$P_NGX_OUT" "$P_NGX_IN" "$P_HAP_OUT" \
    "$P_HAP_IN" "$P_HAP2_OUT" "$P_HAP2_IN"; do
    if ss -Hltn "sport = :$p" | grep -q .; then
        echo "pair.sh: port $p is in use; set BENCH_PORT_BASE to another base" >&2
        exit 1
    fi
done

# ---------------------------------------------------------------- cleanup
WORK="$(mktemp -d /tmp/outrider-bench.XXXXXX)"
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.3
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ $rc -ne 0 || $KEEP == 1 ]]; then
        log "work dir kept: $WORK (logs, configs)"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

declare -A PID
start() { # name, command...
    local name="$1"
    shift
    "${SERVER_PREFIX[@]}" "$@" >"$WORK/$name.out" 2>&1 &
    PID[$name]=$!
    PIDS+=("$!")
}

wait_http() { # url [host]
    local url="$1" host="${2:-}" _
    for _ in $(seq 1 150); do
        if curl -sf -o /dev/null --max-time 1 ${host:+-H "Host: $host"} "$url"; then return 0; fi
        sleep 0.1
    done
    echo "pair.sh: $url${host:+ (Host: $host)} did not answer; logs in $WORK" >&2
    KEEP=1
    exit 2
}

# ---------------------------------------------------------------- backend: nginx
mkdir -p "$WORK/www" "$WORK/tmp" "$RESULTS"
head -c 16384 /dev/urandom >"$WORK/www/16k.bin"
nginx_common() { # name
    cat <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $WORK/$1.pid;
error_log $WORK/$1.err warn;
events { worker_connections 8192; }
EOF
}
nginx_http_common() {
    cat <<EOF
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path $WORK/tmp/body;
    proxy_temp_path $WORK/tmp/proxy;
    fastcgi_temp_path $WORK/tmp/fastcgi;
    uwsgi_temp_path $WORK/tmp/uwsgi;
    scgi_temp_path $WORK/tmp/scgi;
    default_type text/plain;
EOF
}
{
    nginx_common backend
    echo "http {"
    nginx_http_common
    cat <<EOF
    sendfile on;
    server {
        listen 127.0.0.1:$P_NGINX;
        location = / { return 200 "ok"; }
        location = /16k.bin { root $WORK/www; }
    }
}
EOF
} >"$WORK/backend-nginx.conf"
start backend-nginx "$NGINX" -e "$WORK/backend.err" -c "$WORK/backend-nginx.conf"
wait_http "http://127.0.0.1:$P_NGINX/"

# ---------------------------------------------------------------- certs, Outrider pair
declare -A ENDPOINTS=([backend]=$P_BE_IN [echo]=$P_EC_IN)
# shellcheck source=bench/pair-configs.sh
source "$ROOT/bench/pair-configs.sh"
mint_certs web backend echo
sidecar_yaml web 127.0.0.1:9 "$P_WEB_OUT" "$P_WEB_IN" "$P_WEB_ADMIN" >"$WORK/web.yaml"
sidecar_yaml backend "127.0.0.1:$P_NGINX" "$P_BE_OUT" "$P_BE_IN" "$P_BE_ADMIN" >"$WORK/backend.yaml"
start outrider-web "$OUTRIDER" run -c "$WORK/web.yaml" --log-format json --log-level warn
start outrider-backend "$OUTRIDER" run -c "$WORK/backend.yaml" --log-format json --log-level warn
wait_http "http://127.0.0.1:$P_WEB_ADMIN/ready"
wait_http "http://127.0.0.1:$P_BE_ADMIN/ready"
wait_http "http://127.0.0.1:$P_WEB_OUT/" backend

# Each variant: URL, Host header, and the proxy processes whose CPU and RSS are its cost.
VARIANTS=(direct outrider)
declare -A URL HOSTHDR PROCS
URL[direct]="http://127.0.0.1:$P_NGINX"
HOSTHDR[direct]=""
PROCS[direct]=""
URL[outrider]="http://127.0.0.1:$P_WEB_OUT"
HOSTHDR[outrider]="backend"
PROCS[outrider]="outrider-web outrider-backend"

# ---------------------------------------------------------------- peers (--compare)
if [[ $COMPARE == 1 ]]; then
    combined_pems web backend
    # nginx caller sidecar: plain HTTP in, mTLS (TLS 1.3, client cert, peer verified against
    # the CA and its DNS SAN "backend") out, pooled keep-alive upstream connections.
    {
        nginx_common nginx-out
        echo "http {"
        nginx_http_common
        cat <<EOF
    upstream mesh_backend {
        server 127.0.0.1:$P_NGX_IN;
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
    }
    server {
        listen 127.0.0.1:$P_NGX_OUT;
        location / {
            proxy_pass https://mesh_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate $WORK/certs/web.pem;
            proxy_ssl_certificate_key $WORK/certs/web-key.pem;
            proxy_ssl_trusted_certificate $WORK/ca/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name backend;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }
    }
}
EOF
    } >"$WORK/nginx-out.conf"
    # nginx callee sidecar: mTLS in (client cert required, verified against the CA), keep-alive
    # to the app.
    {
        nginx_common nginx-in
        echo "http {"
        nginx_http_common
        cat <<EOF
    upstream app {
        server 127.0.0.1:$P_NGINX;
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
    }
    server {
        listen 127.0.0.1:$P_NGX_IN ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate $WORK/certs/backend.pem;
        ssl_certificate_key $WORK/certs/backend-key.pem;
        ssl_client_certificate $WORK/ca/ca.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_session_cache shared:SSL:4m;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$WORK/nginx-in.conf"
    start nginx-in "$NGINX" -e "$WORK/nginx-in.err" -c "$WORK/nginx-in.conf"
    start nginx-out "$NGINX" -e "$WORK/nginx-out.err" -c "$WORK/nginx-out.conf"

    # HAProxy pairs (bench/pair-configs.sh): "haproxy" speaks HTTP/1.1 between the sidecars,
    # "haproxy-h2" HTTP/2 (ALPN h2).
    haproxy_cfg "$P_HAP_OUT" "$P_HAP_IN" http/1.1 "$P_NGINX" >"$WORK/haproxy.cfg"
    haproxy_cfg "$P_HAP2_OUT" "$P_HAP2_IN" h2 "$P_NGINX" >"$WORK/haproxy-h2.cfg"
    for v in haproxy haproxy-h2; do
        split_haproxy "$WORK/$v.cfg" out >"$WORK/$v-out.cfg"
        split_haproxy "$WORK/$v.cfg" in >"$WORK/$v-in.cfg"
        "$HAPROXY" -c -q -f "$WORK/$v-out.cfg"
        "$HAPROXY" -c -q -f "$WORK/$v-in.cfg"
        start "$v-in" "$HAPROXY" -db -f "$WORK/$v-in.cfg"
        start "$v-out" "$HAPROXY" -db -f "$WORK/$v-out.cfg"
    done
    wait_http "http://127.0.0.1:$P_NGX_OUT/"
    wait_http "http://127.0.0.1:$P_HAP_OUT/"
    wait_http "http://127.0.0.1:$P_HAP2_OUT/"
    VARIANTS+=(nginx haproxy haproxy-h2)
    URL[nginx]="http://127.0.0.1:$P_NGX_OUT"
    HOSTHDR[nginx]=""
    PROCS[nginx]="nginx-out nginx-in"
    URL[haproxy]="http://127.0.0.1:$P_HAP_OUT"
    HOSTHDR[haproxy]=""
    PROCS[haproxy]="haproxy-out haproxy-in"
    URL[haproxy-h2]="http://127.0.0.1:$P_HAP2_OUT"
    HOSTHDR[haproxy-h2]=""
    PROCS[haproxy-h2]="haproxy-h2-out haproxy-h2-in"
fi

# ---------------------------------------------------------------- gRPC (--grpc)
GRPC_VARIANTS=()
if [[ $GRPC == 1 ]]; then
    start echo-app "$LOADGEN" serve --listen "127.0.0.1:$P_ECHO"
    sidecar_yaml echo "127.0.0.1:$P_ECHO" "$P_EC_OUT" "$P_EC_IN" "$P_EC_ADMIN" >"$WORK/echo.yaml"
    start outrider-echo "$OUTRIDER" run -c "$WORK/echo.yaml" --log-format json --log-level warn
    wait_http "http://127.0.0.1:$P_ECHO/"
    wait_http "http://127.0.0.1:$P_EC_ADMIN/ready"
    GRPC_VARIANTS=(grpc-direct grpc-outrider)
    URL[grpc-direct]="http://127.0.0.1:$P_ECHO"
    HOSTHDR[grpc-direct]=""
    PROCS[grpc-direct]=""
    URL[grpc-outrider]="http://127.0.0.1:$P_WEB_OUT"
    HOSTHDR[grpc-outrider]="echo"
    PROCS[grpc-outrider]="outrider-web outrider-echo"
fi

# Sanity: every path answers correctly before anything is measured.
for v in "${VARIANTS[@]}"; do
    body="$(curl -sf --max-time 2 ${HOSTHDR[$v]:+-H "Host: ${HOSTHDR[$v]}"} "${URL[$v]}/")"
    [[ "$body" == ok ]] || { echo "pair.sh: $v answered '$body' at /" >&2; KEEP=1; exit 2; }
    size="$(curl -sf --max-time 2 ${HOSTHDR[$v]:+-H "Host: ${HOSTHDR[$v]}"} "${URL[$v]}/16k.bin" | wc -c)"
    [[ "$size" == 16384 ]] || { echo "pair.sh: $v served $size bytes of /16k.bin" >&2; KEEP=1; exit 2; }
done
for v in "${GRPC_VARIANTS[@]}"; do
    on_load "$LOADGEN" run --url "${URL[$v]}/" ${HOSTHDR[$v]:+--host "${HOSTHDR[$v]}"} --grpc \
        --rate 200 -c 2 --warmup 0 --duration 0.5 >"$WORK/smoke-$v.json" 2>"$WORK/smoke-$v.err"
    python3 - "$WORK/smoke-$v.json" "$v" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
if r["requests"] == 0 or r["errors"]:
    sys.exit(f"pair.sh: gRPC smoke test of {sys.argv[2]} failed: {r['first_error']}")
EOF
done

# ---------------------------------------------------------------- measurement helpers
CLK_TCK="$(getconf CLK_TCK)"
cpu_ticks() { # variant -> utime+stime ticks summed over its proxy processes
    local total=0 name f names
    read -ra names <<<"${PROCS[$1]}"
    for name in "${names[@]}"; do
        f="$(sed 's/.*) //' "/proc/${PID[$name]}/stat")"
        total=$((total + $(awk '{print $12 + $13}' <<<"$f")))
    done
    echo "$total"
}
# One /proc/PID/status field (VmRSS, VmHWM) of each of a variant's proxy processes, in KiB:
# {"proc": KiB, ...}. Each run records the peaks so far, so a reader can see which test set them.
status_kib() { # variant field
    local name names sep="" out="{"
    read -ra names <<<"${PROCS[$1]}"
    for name in "${names[@]}"; do
        out+="$sep\"$name\":$(awk -v f="$2:" '$1 == f {print $2}' "/proc/${PID[$name]}/status")"
        sep=","
    done
    echo "$out}"
}
RAW="$WORK/raw.jsonl"
: >"$RAW"
emit() { echo "$1" >>"$RAW"; }

run_wrk() { # round variant test path [connections]
    local round="$1" v="$2" test="$3" path="$4" conns="${5:-64}" out before after reqs rps errs
    out="$WORK/wrk-$v-$test-$round.txt"
    before="$(cpu_ticks "$v")"
    on_load wrk -t1 -c"$conns" -d"${SECONDS_EACH}s" --timeout 5s \
        ${HOSTHDR[$v]:+-H "Host: ${HOSTHDR[$v]}"} "${URL[$v]}$path" >"$out" 2>&1 || true
    after="$(cpu_ticks "$v")"
    reqs="$(awk '/requests in/ {print $1}' "$out")"
    rps="$(awk '/Requests\/sec/ {print $2}' "$out")"
    errs="$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(/[^0-9 ]/, " "); for (i = 1; i <= NF; i++) n += $i} END {print n + 0}' "$out")"
    if [[ -z "$rps" || -z "$reqs" ]]; then
        log "wrk failed for $v $test: $(tr '\n' ' ' <"$out")"
        rps=0 reqs=0
    fi
    log "round $round $v $test: $rps req/s, $errs errors"
    emit "{\"round\":$round,\"variant\":\"$v\",\"test\":\"$test\",\"connections\":$conns,\"rps\":$rps,\"requests\":$reqs,\"errors\":$errs,\"cpu_ticks\":$((after - before)),\"clk_tck\":$CLK_TCK,\"hwm_after_kib\":$(status_kib "$v" VmHWM)}"
}

run_loadgen() { # round variant test [extra args]
    local round="$1" v="$2" test="$3" out before after
    shift 3
    out="$WORK/lg-$v-$test-$round.json"
    before="$(cpu_ticks "$v")"
    on_load "$LOADGEN" run --url "${URL[$v]}/" ${HOSTHDR[$v]:+--host "${HOSTHDR[$v]}"} \
        --duration "$LAT_SECONDS" --label "$v/$test" "$@" >"$out" 2>"$WORK/lg.err" \
        || { log "loadgen failed for $v $test: $(cat "$WORK/lg.err")"; return 0; }
    after="$(cpu_ticks "$v")"
    log "round $round $(grep '^loadgen' "$WORK/lg.err" | tail -n1 | sed 's/^loadgen //')"
    emit "{\"round\":$round,\"variant\":\"$v\",\"test\":\"$test\",\"cpu_ticks\":$((after - before)),\"clk_tck\":$CLK_TCK,\"hwm_after_kib\":$(status_kib "$v" VmHWM),\"loadgen\":$(jq -c 'del(.percentiles) + {percentiles: [.percentiles[] | [.q, .ms]]}' "$out")}"
}

# ---------------------------------------------------------------- interleaved rounds
log "measuring: ${VARIANTS[*]} ${GRPC_VARIANTS[*]}; $ROUNDS rounds, ${SECONDS_EACH}s per run"
STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
for round in $(seq 1 "$ROUNDS"); do
    for v in "${VARIANTS[@]}"; do
        run_wrk "$round" "$v" small /
        run_wrk "$round" "$v" 16k /16k.bin
        run_loadgen "$round" "$v" latency --warmup 1 --rate "$RATE" -c 16
    done
    for v in "${GRPC_VARIANTS[@]}"; do
        run_loadgen "$round" "$v" grpc-max --warmup 0 --grpc --rate 0 -c 4 --max-inflight 16
        run_loadgen "$round" "$v" grpc-latency --warmup 1 --grpc --rate "$RATE" -c 16
    done
done

# Peak RSS (VmHWM) and current RSS of every process started.
memory_json() {
    local name hwm rss sep=""
    printf '{'
    for name in "${!PID[@]}"; do
        hwm="$(awk '/VmHWM/ {print $2}' "/proc/${PID[$name]}/status" 2>/dev/null || true)"
        rss="$(awk '/VmRSS/ {print $2}' "/proc/${PID[$name]}/status" 2>/dev/null || true)"
        printf '%s"%s":{"hwm_kib":%s,"rss_kib":%s}' "$sep" "$name" "${hwm:-0}" "${rss:-0}"
        sep=","
    done
    printf '}\n'
}
# Sampled before the idle and sweep tests, so the table's peaks are those of the rounds above.
memory_json >"$WORK/memory.json"

# RSS added by 1,000 idle keep-alive connections to each caller sidecar: `loadgen hold` opens
# them one after the other, sends one request on each, and holds them while RSS is sampled.
# (After the peak-RSS sample above, so the idle test does not set the peaks.)
rss_of() { status_kib "$1" VmRSS; } # variant -> {"proc": VmRSS KiB, ...}
if [[ $IDLE == 1 ]]; then
    for v in "${VARIANTS[@]}"; do
        [[ -n "${PROCS[$v]}" ]] || continue
        before="$(rss_of "$v")"
        : >"$WORK/hold-$v.out"
        on_load "$LOADGEN" hold --url "${URL[$v]}/" ${HOSTHDR[$v]:+--host "${HOSTHDR[$v]}"} \
            -c 1000 --seconds 2 >"$WORK/hold-$v.out" 2>"$WORK/hold-$v.err" &
        hold_pid=$!
        during=""
        for _ in $(seq 1 600); do
            if grep -q '^ready' "$WORK/hold-$v.out"; then
                sleep 0.5
                during="$(rss_of "$v")"
                break
            fi
            kill -0 "$hold_pid" 2>/dev/null || break
            sleep 0.1
        done
        wait "$hold_pid" || true
        report="$(tail -n1 "$WORK/hold-$v.out")"
        if [[ -z "$during" || "$report" != "{"* ]]; then
            log "idle test of $v failed: $(cat "$WORK/hold-$v.err")"
            continue
        fi
        log "idle $v: RSS $before -> $during with 1000 idle connections"
        emit "{\"round\":0,\"variant\":\"$v\",\"test\":\"idle\",\"rss_before_kib\":$before,\"rss_during_kib\":$during,\"hold\":$report}"
    done
fi

# Throughput by connection count, 16 to 1,024 (direct and Outrider, interleaved). Last,
# because 1,024 connections raise every proxy's memory high-water mark.
if [[ $SWEEP == 1 ]]; then
    for round in $(seq 1 "$ROUNDS"); do
        for c in 16 64 256 1024; do
            for v in direct outrider; do
                run_wrk "$round" "$v" "sweep-$c" / "$c"
            done
        done
    done
    memory_json >"$WORK/memory-sweep.json"
else
    echo '{}' >"$WORK/memory-sweep.json"
fi

# Outrider's own view: its request counters by status code (and any error metrics), kept in
# the results so that errors seen by the load generators can be traced to a cause.
metrics_json() {
    local name port sep=""
    printf '{'
    for name in outrider-web outrider-backend outrider-echo; do
        [[ -n "${PID[$name]:-}" ]] || continue
        case "$name" in
            outrider-web) port=$P_WEB_ADMIN ;;
            outrider-backend) port=$P_BE_ADMIN ;;
            *) port=$P_EC_ADMIN ;;
        esac
        curl -sf --max-time 2 "http://127.0.0.1:$port/metrics" >"$WORK/metrics-$name.txt" || true
        printf '%s"%s":' "$sep" "$name"
        grep -E '^outrider_[a-z_]*(total|errors)[a-z_]*\{' "$WORK/metrics-$name.txt" \
            | grep -v '_bucket' | jq -Rn '[inputs | capture("^(?<series>[^ ]+) (?<value>[0-9.e+]+)$") | {(.series): (.value | tonumber)}] | add // {}'
        sep=","
    done
    printf '}\n'
}
metrics_json >"$WORK/metrics.json"

# ---------------------------------------------------------------- report
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$RESULTS/pair-$STAMP"
procs_json="$(for v in "${VARIANTS[@]}" "${GRPC_VARIANTS[@]}"; do printf '%s\t%s\n' "$v" "${PROCS[$v]}"; done \
    | jq -Rn '[inputs | split("\t") | {key: .[0], value: (.[1] | split(" ") | map(select(. != "")))}] | from_entries')"
jq -n --arg started "$STARTED" --arg host "$(hostname)" --arg cpu "$MODEL" --argjson ncpu "$NCPU" \
    --arg server_cpus "${SERVER_CPUS:-any}" --arg load_cpus "${LOAD_CPUS:-any}" --argjson nice "$NICE" \
    --arg loadavg_before "$LOADAVG" --arg loadavg_after "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --argjson rounds "$ROUNDS" --argjson seconds "$SECONDS_EACH" --argjson rate "$RATE" \
    --arg outrider "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg nginx "$("$NGINX" -v 2>&1 | sed 's/.*\///')" \
    --arg haproxy "$(if [[ $COMPARE == 1 ]]; then "$HAPROXY" -v | awk 'NR == 1 {print $3}'; else echo -; fi)" \
    --arg wrk "$(wrk -v 2>&1 | awk 'NR == 1 {print $2}')" \
    --argjson procs "$procs_json" --argjson memory "$(cat "$WORK/memory.json")" \
    --argjson memory_sweep "$(cat "$WORK/memory-sweep.json")" \
    --argjson outrider_metrics "$(cat "$WORK/metrics.json")" \
    --arg variants "${VARIANTS[*]} ${GRPC_VARIANTS[*]}" \
    --arg link_order "$LINK_ORDER" \
    '{started: $started, host: $host, cpu: $cpu, ncpu: $ncpu, server_cpus: $server_cpus,
      load_cpus: $load_cpus, nice: $nice, loadavg_before: $loadavg_before, loadavg_after: $loadavg_after,
      rounds: $rounds, seconds: $seconds, rate: $rate, outrider_commit: $outrider,
      link_order: $link_order,
      versions: {nginx: $nginx, haproxy: $haproxy, wrk: $wrk},
      variants: ($variants | split(" ") | map(select(. != ""))), processes: $procs,
      memory: $memory, memory_after_sweep: $memory_sweep, outrider_metrics: $outrider_metrics,
      runs: [inputs]}' "$RAW" >"$OUT.json"
python3 "$ROOT/bench/report.py" "$OUT.json" --markdown "$OUT.md" --plot "$OUT.png"
ln -sf "$(basename "$OUT.json")" "$RESULTS/latest.json"
ln -sf "$(basename "$OUT.md")" "$RESULTS/latest.md"
[[ -f "$OUT.png" ]] && ln -sf "$(basename "$OUT.png")" "$RESULTS/latest.png"
log "results: $OUT.json, $OUT.md$([[ -f "$OUT.png" ]] && echo ", $OUT.png")"
