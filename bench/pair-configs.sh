# Sourced by bench/pair.sh and bench/pair-setup.sh: the Outrider side of a benchmark pair.
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
