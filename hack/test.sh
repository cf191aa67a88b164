#!/usr/bin/env bash
# Runs the whole test suite on this machine: formatting, lints, the CRD drift check, unit
# tests, and the integration tests against a real local control plane (etcd,
# kube-apiserver, kube-controller-manager) and a real node (kubelet, containerd, runc;
# hack/node.sh) that this script builds once and caches under ~/.cache/pullkeeper. Run
# from anywhere; needs root (apt-get on a fresh machine, and the node).
#
#   PULLKEEPER_KEEP_CONTROL_PLANE=1   leave the control plane running afterwards (faster reruns)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# In CI, keep compiled dependencies between runs (each run is a fresh clone).
if [[ -n "${CI:-}" && -z "${CARGO_TARGET_DIR:-}" ]]; then
  export CARGO_TARGET_DIR="$HOME/.cache/pullkeeper/target"
fi
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

step() { printf '\n==> %s\n' "$*" >&2; }

step "installing prerequisites"
hack/prereqs.sh

# The suite tests the Kubernetes the README names, built from Go modules: never the
# older fallback that hack/control-plane.sh offers the demo (a failed build fails here,
# loudly, instead of passing against another Kubernetes).
export PULLKEEPER_CP_ROUTE="${PULLKEEPER_CP_ROUTE:-gomod}"

step "preparing the local control plane (first run builds Kubernetes: 5-25 minutes)"
cp_dir="$target_dir/tmp/control-plane"
kubeconfig="$(hack/control-plane.sh start "$cp_dir" | tail -n1)"
cleanup() {
  hack/node.sh stop "$target_dir/tmp/node" >/dev/null 2>&1 || true
  hack/moto.sh stop "$target_dir/tmp/moto" >/dev/null 2>&1 || true
  hack/moto.sh stop "$target_dir/tmp/moto-auth" >/dev/null 2>&1 || true
  hack/registry.sh stop "$target_dir/tmp/registry" >/dev/null 2>&1 || true
  hack/registry.sh stop "$target_dir/tmp/registry-tls" >/dev/null 2>&1 || true
  hack/registry.sh stop "$target_dir/tmp/registry-token" >/dev/null 2>&1 || true
  if [[ "${PULLKEEPER_KEEP_CONTROL_PLANE:-}" != 1 ]]; then
    hack/control-plane.sh stop "$cp_dir" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

step "building kubelet and kubectl of the control plane's version (once; about 3 minutes)"
hack/control-plane.sh kubectl >/dev/null

step "the node harness: a pod runs, and stop leaves nothing on the host"
# a node left by an interrupted run would share the node name
hack/node.sh stop "$target_dir/tmp/node" >/dev/null
hack/node-check.sh "$kubeconfig"

step "preparing moto (AWS API server) and helm"
hack/moto.sh install
hack/tools.sh >/dev/null

step "rustfmt"
cargo fmt --all --check

step "clippy"
cargo clippy --locked --all-targets -- -D warnings

step "tests"
cargo test --locked --all-targets "$@"

step "static release binary (what the Dockerfile ships)"
hack/static-build.sh >/dev/null

step "Helm chart"
hack/chart-test.sh "$kubeconfig"
