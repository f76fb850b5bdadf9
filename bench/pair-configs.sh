# Sourced by bench/pair.sh and bench/pair-setup.sh: the Outrider side of a benchmark pair, and
# the HAProxy peer pair (bench/pair.sh --compare, bench/cpu-split.sh).
# Expects OUTRIDER (binary), WORK (work dir) and ENDPOINTS, an associative array of each meshed
# service's inbound port (e.g. ENDPOINTS[backend]=$P_BE_IN).

# mint_certs SERVICE...: a CA in $WORK/ca and a certificate per service in $WORK/certs.
mint_certs() {
    "$OUTRIDER" certs ca --out "$WORK/ca" >/dev/null
    local svc
    for svc in "$@"; do
        "$OUTRIDER" certs issue --ca "$WORK/ca" --service "$svc" --out "$WORK/certs" >/dev/null
    done
}

# sidecar_yaml SERVICE APP OUT IN ADMIN: a sidecar config with mTLS and every ENDPOINTS entry.
sidecar_yaml() {
    cat <<EOC
service: $1
app: $2
listen: { outbound: 127.0.0.1:$3, inbound: 127.0.0.1:$4, admin: 127.0.0.1:$5 }
tls: { ca: $WORK/ca/ca.pem, cert: $WORK/certs/$1.pem, key: $WORK/certs/$1-key.pem }
discovery:
  services:
EOC
    local svc
    for svc in "${!ENDPOINTS[@]}"; do
        echo "    $svc: { endpoints: [\"127.0.0.1:${ENDPOINTS[$svc]}\"] }"
    done
}

# combined_pems SERVICE...: certificate and key in one file per service, as HAProxy takes them.
combined_pems() {
    local svc
    for svc in "$@"; do
        cat "$WORK/certs/$svc.pem" "$WORK/certs/$svc-key.pem" >"$WORK/certs/$svc-combined.pem"
    done
}

# haproxy_cfg OUT IN ALPN APP: an HAProxy pair (both sides in one file, see split_haproxy) from
# port OUT through mTLS on port IN to the app on port APP. One thread each, keep-alive and
# connection reuse on every leg, TLS 1.3 with client certs, the peer verified against the CA
# and its DNS SAN. ALPN http/1.1 or h2 between the sidecars. Needs combined_pems web backend.
haproxy_cfg() {
    cat <<EOF
global
    nbthread 1
    maxconn 4096
    log stderr format raw local0 err
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend out
    bind 127.0.0.1:$1
    default_backend mesh
backend mesh
    server backend 127.0.0.1:$2 ssl crt $WORK/certs/web-combined.pem ca-file $WORK/ca/ca.pem verify required verifyhost backend sni str(backend) ssl-min-ver TLSv1.3 alpn $3
frontend in
    bind 127.0.0.1:$2 ssl crt $WORK/certs/backend-combined.pem ca-file $WORK/ca/ca.pem verify required ssl-min-ver TLSv1.3 alpn $3
    default_backend app
backend app
    server app 127.0.0.1:$4
EOF
}

# split_haproxy CFG SIDE: the half of a haproxy_cfg file that one process runs (out or in).
split_haproxy() {
    awk -v side="$2" '
        /^(frontend|backend) / { keep = (side == "out") ? ($2 == "out" || $2 == "mesh") : ($2 == "in" || $2 == "app") }
        /^(global|defaults)/ { keep = 1 }
        keep' "$1"
}
