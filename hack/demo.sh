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
  hack/node.sh stop "$root/.demo/node" >/dev/null 2>&1 || true
  hack/registry.sh stop "$root/.demo/registry" >/dev/null 2>&1 || true
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

# The real thing: a private registry, a real node, and a pod pulled with the secret
# pullkeeper wrote (the node runs containerd and a kubelet, so it needs root).
if [[ $(id -u) -ne 0 ]]; then
  say "skipping the real node: it needs root (run hack/demo.sh as root to see a pod pull)"
else
  say "a private registry (htpasswd) with a small image, and a real node (kubelet, containerd, runc)"
  reg="$(hack/registry.sh start "$root/.demo/registry" demo demo-password | tail -n1)"
  hack/node.sh start "$root/.demo/node" "$KUBECONFIG" | tail -n1 | sed 's/^/    node: /'
  skopeo copy --quiet --dest-tls-verify=false --dest-creds demo:demo-password \
    "oci:$root/.demo/node/images/oci:app" "docker://$reg/demo/hello:1"
  hack/node.sh trust "$root/.demo/node" "$reg"
  echo "    image: $reg/demo/hello:1 (anonymous pulls get 401)"

  say "a ClusterRegistryCredential for it, verifying the image, and a Deployment in team-a"
  "$kubectl" apply --server-side -f - <<EOF
apiVersion: v1
kind: Secret
metadata: {name: private-login, namespace: pullkeeper-system}
type: Opaque
stringData: {username: demo, password: demo-password}
---
apiVersion: pullkeeper.io/v1alpha1
kind: ClusterRegistryCredential
metadata: {name: demo-private}
spec:
  registry: "$reg"
  provider:
    basic:
      secretRef: {name: private-login, namespace: pullkeeper-system}
  target:
    namespaceSelector:
      matchLabels: {pullkeeper.io/demo: "true"}
  verify:
    images: ["$reg/demo/hello:1"]
EOF
  # A credential is in place a moment after it is applied: wait for it before deploying
  # (pods created from then on get the secret, whatever their namespace's age).
  for _ in $(seq 1 60); do
    [[ "$("$kubectl" -n team-a get serviceaccount default -o jsonpath='{.imagePullSecrets[*].name}')" == *pullkeeper-demo-private* ]] && break
    sleep 0.5
  done
  "$kubectl" apply --server-side -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello, namespace: team-a}
spec:
  replicas: 1
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello}}
    spec:
      nodeName: localhost   # this control plane runs no scheduler
      terminationGracePeriodSeconds: 0
      containers: [{name: hello, image: "$reg/demo/hello:1", imagePullPolicy: Always}]
EOF
  for _ in $(seq 1 120); do
    phase="$("$kubectl" -n team-a get pods -l app=hello -o jsonpath='{.items[0].status.phase}' 2>/dev/null || true)"
    [[ "$phase" == Running ]] && break
    sleep 0.5
  done

  say "the pod, pulled with the secret pullkeeper wrote"
  "$kubectl" -n team-a get pods -l app=hello -o wide
  "$kubectl" -n team-a get pods -l app=hello \
    -o jsonpath='    imagePullSecrets: {.items[0].spec.imagePullSecrets[*].name}{"\n"}'
  "$kubectl" -n team-a get events --field-selector reason=Pulled \
    -o custom-columns='REASON:.reason,MESSAGE:.message' 2>/dev/null | sed 's/^/    /'

  say "verify: is the image pullable with the credential?"
  for _ in $(seq 1 60); do
    [[ -n "$("$kubectl" get clusterregistrycredential demo-private -o jsonpath='{.status.images[0].reason}' 2>/dev/null)" ]] && break
    sleep 0.5
  done
  "$kubectl" get clusterregistrycredential demo-private \
    -o go-template='{{range .status.images}}{{printf "    %s pullable=%v %s %s\n" .image .pullable .reason .digest}}{{end}}'
fi

cat <<EOT

The control plane is still running. To look around:
    export KUBECONFIG=$KUBECONFIG
    $kubectl get crc
To stop it:
    hack/demo.sh stop
EOT
