#!/usr/bin/env bash
# Mints the mesh's certificates and writes them as Kubernetes manifests (no kubectl needed):
#
#   OUT/ca/ca.pem, OUT/ca/ca-key.pem   the mesh CA (kept: re-running reuses it; keep it secret)
#   OUT/secrets.yaml                   one kubernetes.io/tls Secret per demo service
#                                      (outrider-identity-<service>: tls.crt, tls.key, ca.crt),
#                                      the injector's serving cert (outrider-injector-tls),
#                                      the broker credentials (rabbitmq, outrider-broker)
#   OUT/webhook.yaml                   the MutatingWebhookConfiguration with caBundle set
#
# Usage: deploy/kubernetes/mint-certs.sh [OUT]          (default OUT: ./outrider-secrets)
# Environment: OUTRIDER (the binary, default: outrider on PATH), NAMESPACE (demo),
#              TRUST_DOMAIN (mesh.local), DAYS (workload cert validity, 365),
#              SERVICES (space-separated; default: the demo services).
# Then: kubectl apply -f OUT/secrets.yaml && kubectl apply -f OUT/webhook.yaml
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-./outrider-secrets}"
outrider="${OUTRIDER:-outrider}"
namespace="${NAMESPACE:-demo}"
trust_domain="${TRUST_DOMAIN:-mesh.local}"
days="${DAYS:-365}"
services="${SERVICES:-gateway user-service course-service runner-service tester-service submission-service file-service email-worker}"
injector_namespace=outrider-system

command -v "$outrider" >/dev/null 2>&1 || {
  echo "mint-certs.sh: '$outrider' not found; build it (cargo build --release) and set OUTRIDER=path" >&2
  exit 1
}

mkdir -p "$out"
umask 077

b64() { base64 -w0 <"$1"; }
b64s() { printf '%s' "$1" | base64 -w0; }

if [[ ! -f "$out/ca/ca.pem" || ! -f "$out/ca/ca-key.pem" ]]; then
  "$outrider" certs ca --out "$out/ca" --trust-domain "$trust_domain" >/dev/null
  echo "minted the mesh CA in $out/ca" >&2
else
  echo "reusing the mesh CA in $out/ca" >&2
fi

# A TLS Secret in the layout cert-manager also writes, so it can take over issuing later.
tls_secret() { # name namespace service-dir service
  cat <<EOF
---
apiVersion: v1
kind: Secret
metadata:
  name: $1
  namespace: $2
  labels:
    app.kubernetes.io/part-of: outrider
type: kubernetes.io/tls
data:
  tls.crt: $(b64 "$3/$4.pem")
  tls.key: $(b64 "$3/$4-key.pem")
  ca.crt: $(b64 "$out/ca/ca.pem")
EOF
}

secrets="$out/secrets.yaml"
{
  echo "# Written by deploy/kubernetes/mint-certs.sh; holds private keys: do not commit."
  for service in $services; do
    "$outrider" certs issue --ca "$out/ca" --service "$service" --namespace "$namespace" \
      --days "$days" --out "$out/workloads" >/dev/null
    tls_secret "outrider-identity-$service" "$namespace" "$out/workloads" "$service"
  done

  # The API server calls https://outrider-injector.outrider-system.svc; `certs issue` puts
  # that name in the certificate's DNS SANs.
  "$outrider" certs issue --ca "$out/ca" --service outrider-injector \
    --namespace "$injector_namespace" --days "$days" --out "$out/injector" >/dev/null
  tls_secret outrider-injector-tls "$injector_namespace" "$out/injector" outrider-injector

  # Broker credentials: made once, then reused so re-running does not lock the sidecars out.
  if [[ ! -f "$out/rabbitmq-password" ]]; then
    head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$out/rabbitmq-password"
  fi
  password="$(cat "$out/rabbitmq-password")"
  cat <<EOF
---
apiVersion: v1
kind: Secret
metadata:
  name: rabbitmq
  namespace: $namespace
type: Opaque
data:
  username: $(b64s outrider)
  password: $(b64s "$password")
---
# Its keys become the sidecars' environment (annotation outrider.io/env-secret).
apiVersion: v1
kind: Secret
metadata:
  name: outrider-broker
  namespace: $namespace
type: Opaque
data:
  OUTRIDER_BROKER_URL: $(b64s "amqp://outrider:$password@rabbitmq.$namespace.svc.cluster.local:5672/%2f")
EOF
} >"$secrets"
echo "wrote $secrets" >&2

ca_bundle="$(b64 "$out/ca/ca.pem")"
sed -E "s|^( *)clientConfig:\$|&\n\1  caBundle: $ca_bundle|" "$here/templates/webhook.yaml" >"$out/webhook.yaml"
grep -q "caBundle: $ca_bundle" "$out/webhook.yaml" || {
  echo "mint-certs.sh: could not set caBundle in $out/webhook.yaml" >&2
  exit 1
}
echo "wrote $out/webhook.yaml" >&2
