#!/usr/bin/env bash
# Runs pullkeeper end to end with no cluster: starts a local control plane (etcd,
# kube-apiserver, kube-controller-manager; built once and cached), installs the CRDs,
# runs the operator, applies examples/quickstart.yaml, and shows what happened.
#
#   hack/demo.sh          run the demo (the control plane is left running; see the end)
#   hack/demo.sh stop     stop the demo's control plane
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
cp_dir="$root/.demo/control-plane"

if [[ "${1:-}" == stop ]]; then
  hack/control-plane.sh stop "$cp_dir"
  exit 0
fi

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "installing prerequisites"
hack/prereqs.sh

say "starting a local control plane (the first run builds Kubernetes: 15-25 minutes)"
export KUBECONFIG
KUBECONFIG="$(hack/control-plane.sh start "$cp_dir" | tail -n1)"
# kubectl of the server's version, built and cached with the control plane
kubectl="$(hack/control-plane.sh kubectl | tail -n1)"
"$kubectl" version 2>/dev/null | sed 's/^/    /'

say "building pullkeeper"
cargo build --locked --quiet
bin="${CARGO_TARGET_DIR:-$root/target}/debug/pullkeeper"

say "installing the CRDs (pullkeeper crds | kubectl apply --server-side -f -)"
"$bin" crds | "$kubectl" apply --server-side -f -
"$kubectl" wait --for=condition=Established --timeout=60s crd/clusterregistrycredentials.pullkeeper.io crd/registrycredentials.pullkeeper.io >/dev/null

say "starting the operator (log: .demo/operator.log)"
PULLKEEPER_METRICS_ADDR=127.0.0.1:0 "$bin" controller >"$root/.demo/operator.log" 2>&1 &
op=$!
trap 'kill "$op" 2>/dev/null || true; wait "$op" 2>/dev/null || true' EXIT

say "applying examples/quickstart.yaml"
"$kubectl" apply --server-side -f examples/quickstart.yaml

say "waiting for the operator to report status"
for _ in $(seq 1 60); do
  if [[ -n "$("$kubectl" get clusterregistrycredential demo-registry -o jsonpath='{.status.conditions[?(@.type=="Ready")].reason}' 2>/dev/null)" ]]; then
    break
  fi
  sleep 0.5
done

say "kubectl get clusterregistrycredentials -o wide"
"$kubectl" get clusterregistrycredentials -o wide

say "status conditions"
"$kubectl" get clusterregistrycredential demo-registry \
  -o go-template='{{range .status.conditions}}{{printf "    %-17s %-6s %-24s %s\n" .type .status .reason .message}}{{end}}'

say "pull secrets written by pullkeeper"
"$kubectl" get secrets -A -l app.kubernetes.io/managed-by=pullkeeper \
  -o custom-columns='NAMESPACE:.metadata.namespace,NAME:.metadata.name,TYPE:.type' 2>/dev/null || true

say "imagePullSecrets of the default ServiceAccounts"
for ns in team-a team-b; do
  printf '    %s: %s\n' "$ns" "$("$kubectl" -n "$ns" get serviceaccount default -o jsonpath='{.imagePullSecrets[*].name}' 2>/dev/null)"
done

say "events"
"$kubectl" get events -A --field-selector involvedObject.kind=ClusterRegistryCredential \
  -o custom-columns='TYPE:.type,REASON:.reason,OBJECT:.involvedObject.name,MESSAGE:.message' 2>/dev/null || true

cat <<EOT

The control plane is still running. To look around:
    export KUBECONFIG=$KUBECONFIG
    $kubectl get crc
To stop it:
    hack/demo.sh stop
EOT
