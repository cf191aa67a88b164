#!/usr/bin/env bash
# Checks that hack/node.sh leaves nothing behind: starts a node in a scratch directory
# against a running control plane, runs a pod on it (sandbox, bridge, veth, overlay
# mounts, cgroups), stops the node, and compares what the node could have touched on the
# host with how it was before: mounts, iptables rules, network links, the sysctls the
# kubelet wants, cgroups, and the host paths containerd and the kubelet hard-code.
#
#   hack/node-check.sh KUBECONFIG
#
# Exits non-zero, with the differences, if anything is left; fails loudly if the node
# cannot start. Takes about 15 seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# -eq 1 && -r "$1" ]] || { echo "usage: $0 KUBECONFIG" >&2; exit 2; }
kubeconfig="$(realpath -- "$1")"
kubectl="$(hack/control-plane.sh kubectl | tail -n1)"
dir="$(mktemp -d "${TMPDIR:-/tmp}/pullkeeper-node-check.XXXXXX")"
trap 'hack/node.sh stop "$dir/node" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT

# What a node could leave on the host, filtered to what is its own, so that other
# activity on the machine does not show up.
snapshot() {
  echo "# mounts"
  awk -v d="$dir" '$5 ~ "^" d || $5 ~ "^/(run/containerd|run/netns|run/mount|var/lib/kubelet|var/lib/cni|var/log/containers)" || $9 == "overlay" || $9 == "nsfs" {print $5, $9}' \
    /proc/self/mountinfo | sort
  echo "# iptables"
  if command -v iptables-save >/dev/null; then iptables-save 2>/dev/null | grep -v '^[#:]' | sort || true; fi
  if command -v ip6tables-save >/dev/null; then ip6tables-save 2>/dev/null | grep -v '^[#:]' | sort || true; fi
  echo "# links"
  ip -o link | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^(pkbr|veth|cni)' | sort || true
  echo "# sysctls"
  local s
  for s in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops \
    kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/ipv4/ip_forward; do
    echo "${s} $(cat "/proc/sys/${s}")"
  done
  echo "# cgroups"
  find /sys/fs/cgroup -maxdepth 3 -type d \( -name 'pullkeeper-node-*' -o -name kubepods -o -name 'kubepods*' \) | sort
  echo "# paths"
  for s in /run/containerd /run/netns /run/mount /var/lib/kubelet /var/lib/cni /var/log/containers /opt/containerd /opt/cni /etc/cni; do
    [[ -e "${s}" ]] && echo "${s}: $(find "${s}" | wc -l) entries"
  done
  echo "# processes"
  { pgrep -f -- "$dir" || true; } | wc -l
}

before="$(snapshot)"
hack/node.sh start "$dir/node" "$kubeconfig" >/dev/null
kc() { "$kubectl" --kubeconfig "$kubeconfig" --cache-dir "$dir/kubectl-cache" "$@"; }
ns="node-check-$RANDOM$RANDOM"
kc create namespace "$ns" >/dev/null
cat <<EOF | kc apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: sleeper, namespace: $ns}
spec:
  nodeName: localhost
  terminationGracePeriodSeconds: 0
  automountServiceAccountToken: false
  containers:
  - name: sleeper
    image: localhost/pullkeeper/pause:1
    imagePullPolicy: Never
EOF
kc -n "$ns" wait --for=condition=Ready pod/sleeper --timeout=60s >/dev/null || {
  kc -n "$ns" describe pod sleeper >&2
  echo "node-check: the pod did not run on the node" >&2
  exit 1
}
ip="$(kc -n "$ns" get pod sleeper -o jsonpath='{.status.podIP}')"
during="$(snapshot)"
hack/node.sh stop "$dir/node" >/dev/null
kc delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
after="$(snapshot)"

if [[ "$before" == "$during" ]]; then
  echo "node-check: the snapshot saw nothing of the running node; it cannot prove anything" >&2
  exit 1
fi
if [[ "$before" != "$after" ]]; then
  echo "node-check: the node left something behind (- before, + after stop):" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
echo "node-check: a pod ran (IP $ip); after stop the host is as before"
