# Sourced by bench/callgrind.sh, bench/profile.sh and bench/ab.sh: the minimal pair they use.
# Expects ROOT, OUTRIDER (binary), BASE (port base) and NAME (for the work dir); sets the ports,
# WORK, PIDS and an EXIT trap, starts an nginx backend (`return 200 "ok"` at /, a 16 KiB file at
# /16k.bin, one worker,
# keep-alive), mints certificates and writes $WORK/web.yaml and $WORK/backend.yaml (web →
# backend over mTLS) with bench/pair-configs.sh, as bench/pair.sh does.
# Starting the sidecars is the caller's part (each script wraps them differently).
# NGINX_PREFIX (an array, e.g. (taskset -c 0)) prefixes the nginx command.

P_NGINX=$BASE P_WEB_OUT=$((BASE + 1)) P_WEB_IN=$((BASE + 2)) P_WEB_ADMIN=$((BASE + 3))
P_BE_OUT=$((BASE + 4)) P_BE_IN=$((BASE + 5)) P_BE_ADMIN=$((BASE + 6))
WORK="$(mktemp -d "/tmp/outrider-$NAME.XXXXXX")"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# The number before WORD in loadgen's one-line summary on standard input ("8000 ok, 0 errors,
# … 1520 req/s; …"): loadgen_figure ok, → requests answered; loadgen_figure req/s; → the rate.
loadgen_figure() { # word
    awk -v word="$1" '{for (i = 1; i < NF; i++) if ($(i + 1) == word) print $i}'
}

mkdir -p "$WORK/tmp"
head -c 16384 /dev/zero | tr '\0' x >"$WORK/16k.bin"
cat >"$WORK/nginx.conf" <<EOC
daemon off;
master_process off;
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path $WORK/tmp/body;
    proxy_temp_path $WORK/tmp/proxy;
    fastcgi_temp_path $WORK/tmp/fastcgi;
    uwsgi_temp_path $WORK/tmp/uwsgi;
    scgi_temp_path $WORK/tmp/scgi;
    server {
        listen 127.0.0.1:$P_NGINX;
        location = / { return 200 "ok"; }
        location = /16k.bin { root $WORK; }
    }
}
EOC
"${NGINX_PREFIX[@]}" nginx -e "$WORK/nginx.err" -c "$WORK/nginx.conf" &
PIDS+=($!)
declare -A ENDPOINTS=([backend]=$P_BE_IN)
# shellcheck source=bench/pair-configs.sh
source "$ROOT/bench/pair-configs.sh"
mint_certs web backend
sidecar_yaml web 127.0.0.1:9 "$P_WEB_OUT" "$P_WEB_IN" "$P_WEB_ADMIN" >"$WORK/web.yaml"
sidecar_yaml backend "127.0.0.1:$P_NGINX" "$P_BE_OUT" "$P_BE_IN" "$P_BE_ADMIN" >"$WORK/backend.yaml"

# Starts the caller (web) and callee (backend) sidecars, each command prefixed by the arguments
# (e.g. valgrind and its options; the word @SIDE@ in them becomes web or backend), records their
# pids in PIDS, PID_web and PID_backend, and waits until the pair answers.
start_sidecars() {
    local side
    for side in web backend; do
        OUTRIDER_WORKER_THREADS="${OUTRIDER_WORKER_THREADS:-1}" "${@//@SIDE@/$side}" \
            "$OUTRIDER" run -c "$WORK/$side.yaml" --log-level warn >"$WORK/$side.log" 2>&1 &
        PIDS+=($!)
        eval "PID_${side}=$!"
    done
    for _ in $(seq 1 600); do
        curl -sf -o /dev/null --max-time 2 -H "Host: backend" "http://127.0.0.1:$P_WEB_OUT/" && return 0
        sleep 0.2
    done
}
