#!/usr/bin/env bash
# A real Kubernetes node on this machine for integration tests: a kubelet (the control
# plane's version, built by hack/control-plane.sh) with containerd and runc (Debian
# packages), registered as node "localhost" against a running control plane.
#
#   hack/node.sh start DIR KUBECONFIG   start (or reuse) a node whose state lives in DIR;
#                                       waits until the node is Ready; last line of stdout:
#                                       the node name
#   hack/node.sh stop DIR [OWNER]       stop it and remove every trace of it (idempotent);
#                                       with OWNER, only if the last start was made with
#                                       PULLKEEPER_NODE_OWNER=OWNER (a test process that
#                                       stops "its" node when it exits, unless another
#                                       process has taken the node over meanwhile)
#   hack/node.sh status DIR             print what runs; exit 0 only if the node is up
#   hack/node.sh trust DIR HOST:PORT [CA_FILE]
#                                       let containerd pull from a registry: plain HTTP, or
#                                       HTTPS verified with CA_FILE (certs.d/HOST:PORT/hosts.toml;
#                                       read at each pull, so it works on a running node)
#
# Needs root. Installs containerd, runc, containernetworking-plugins, busybox-static,
# umoci and skopeo with apt-get when they are missing.
#
# Host hygiene: containerd and the kubelet run inside a private mount namespace (held by a
# `sleep` started with unshare). In it, tmpfs covers the few host paths they hard-code
# (/run/containerd, /run/netns, /run/mount, /var/lib/kubelet, /var/lib/cni, /var/log/containers), and
# the sysctls the kubelet insists on are bind-mounted over with the values it wants, so
# the host's are never rewritten. Everything else lives in DIR; the kubelet gets its own
# cgroup root; makeIPTablesUtilChains is off (no iptables rules); all listeners are on
# 127.0.0.1. Pods get an address from a bridge that has no IPv4 address on the host (no
# routes, NAT or iptables rules); pulls happen in the host's network, so registries on
# 127.0.0.1 work. `stop` kills what runs in the cgroup root and the mount namespace,
# deletes the bridge, the cgroups and the Node object, and removes the host directories it
# had to create as mount points.
#
# Files in DIR: images/oci (OCI layout: tag "pause", the sandbox image, and tag "app", a
# busybox image whose entrypoint sleeps; tests push it to their registries), logs/
# (containerd.log, kubelet.log; kept after stop), state.env, owner, kubeconfig,
# containerd/ (certs.d/HOST:PORT/hosts.toml), kubelet/, pod-logs/.
#
# Environment knobs:
#   PULLKEEPER_NODE_TIMEOUT   seconds to wait for the node to be Ready (default 120)
set -euo pipefail

readonly PROG="${0##*/}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly HERE
readonly NODE_NAME=localhost
TIMEOUT="${PULLKEEPER_NODE_TIMEOUT:-120}"
# Host paths containerd, the CNI library and the kubelet use whatever the configuration
# says; each is covered by a tmpfs inside the node's mount namespace.
readonly HOST_PATHS=(/run/containerd /run/netns /run/mount /var/lib/kubelet /var/lib/cni /var/log/containers)
# The sysctls the kubelet's container manager sets at start, with the values it wants.
# Machine-wide: the host directories nodes created, and the lock running nodes share.
readonly SHARED="${PULLKEEPER_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME}/.cache}/pullkeeper}/node"
readonly USERS_LOCK="${SHARED}/users.lock"
readonly SYSCTLS=(vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1
  kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000)

log() { printf '%s: %s\n' "${PROG}" "$*" >&2; }

usage() {
  cat >&2 <<EOF
usage: ${PROG} start DIR KUBECONFIG
       ${PROG} stop DIR [OWNER]
       ${PROG} status DIR
       ${PROG} trust DIR HOST:PORT [CA_FILE]
EOF
  exit 2
}

STARTING=0

# Print the last lines of the node's logs, undo a half-done start (the logs stay), and fail.
fail() {
  local f
  log "error: $*"
  for f in "${DIR}/logs/containerd.log" "${DIR}/logs/kubelet.log"; do
    if [[ -s "${f}" ]]; then
      printf -- '----- last 25 lines of %s -----\n' "${f}" >&2
      tail -n 25 "${f}" | sed 's/^/  /' >&2
    fi
  done
  if ((STARTING)); then
    STARTING=0
    log "removing what the failed start left (logs kept in ${DIR}/logs)"
    stop_all || true
  fi
  exit 1
}

ensure_packages() {
  local pkgs=() pair
  for pair in containerd:containerd runc:runc ctr:containerd umoci:umoci skopeo:skopeo \
    nsenter:util-linux unshare:util-linux flock:util-linux ip:iproute2; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || pkgs+=("${pair#*:}")
  done
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] ||
    pkgs+=(containernetworking-plugins)
  busybox_static || pkgs+=(busybox-static)
  ((${#pkgs[@]} == 0)) && return 0
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "error: missing packages: ${pkgs[*]} (install them, or run as root on Debian)"
    exit 1
  fi
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
  log "installing ${pkgs[*]} with apt-get"
  apt-get update -q >&2 || { log "error: apt-get update failed"; exit 1; }
  # The node runs its own containerd: keep the package from starting the system's one
  # (policy-rc.d is what invoke-rc.d and deb-systemd-invoke ask).
  local policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"${policy}"
    chmod 755 "${policy}"
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2 || rc=$?
  if [[ -n "${policy}" ]]; then rm -f "${policy}"; fi
  ((rc == 0)) || { log "error: apt-get install ${pkgs[*]} failed"; exit 1; }
  busybox_static || { log "error: /bin/busybox is not a static binary after installing busybox-static"; exit 1; }
}

busybox_static() {
  [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
pid_of() { [[ -f "${DIR}/$1.pid" ]] && tr -dc '0-9' <"${DIR}/$1.pid"; return 0; }
# The PID in NAME.pid only while it still is one of the node's processes (in its mount
# namespace, since this boot): a stale file never makes stop signal an unrelated process.
our_pid() {
  local p
  p="$(pid_of "$1")"
  if [[ -n "${p}" ]] && this_boot && [[ "$(readlink "/proc/${p}/ns/mnt" 2>/dev/null)" == "${MNT_NS}" ]]; then
    printf '%s\n' "${p}"
  fi
  return 0
}
# Was the state recorded since the last boot? (Namespace inode numbers are reused.)
this_boot() { [[ -n "${MNT_NS:-}" && "${BOOT_ID:-}" == "$(cat /proc/sys/kernel/random/boot_id)" ]]; }
in_ns() { nsenter -t "$(pid_of ns)" -m -- "$@"; }
ctr_() { ctr --address "${DIR}/containerd/containerd.sock" "$@"; }
kc() { "${KUBECTL}" --kubeconfig "${DIR}/kubeconfig" --cache-dir "${DIR}/kubectl-cache" --request-timeout=10s "$@"; }

load_state() {
  [[ -f "${DIR}/state.env" ]] || return 1
  # shellcheck source=/dev/null
  source "${DIR}/state.env"
}

# A name and a /24 derived from DIR, so that nodes in different directories never share
# a bridge, a cgroup root or addresses.
derive_names() {
  local h
  h="$(printf '%s' "${DIR}" | sha256sum | cut -c1-6)"
  BRIDGE="pkbr${h}"
  CGROUP_NAME="pullkeeper-node-${h}"
  SUBNET="10.$((200 + 16#${h:0:2} % 50)).$((16#${h:2:2})).0/24"
}

# ---------------------------------------------------------------------------
# start

build_images() {
  local d="${DIR}/images"
  [[ -f "${d}/pause.tar" && -f "${d}/oci/index.json" ]] && return 0
  rm -rf "${d}"
  mkdir -p "${d}"
  (
    cd "${d}"
    umoci init --layout oci
    umoci new --image oci:base
    umoci unpack --image oci:base bundle >/dev/null
    mkdir -p bundle/rootfs/bin
    cp /bin/busybox bundle/rootfs/bin/busybox
    ln -s busybox bundle/rootfs/bin/sh
    umoci repack --image oci:base bundle
    rm -rf bundle
    umoci config --image oci:base --tag pause --config.entrypoint /bin/busybox \
      --config.cmd sleep --config.cmd 2147483647
    umoci config --image oci:base --tag app --config.entrypoint /bin/busybox \
      --config.cmd sleep --config.cmd 3600
    mkdir -p tmp
    TMPDIR="${d}/tmp" skopeo copy -q oci:oci:pause docker-archive:pause.tar:localhost/pullkeeper/pause:1
    rm -rf tmp
  ) >"${DIR}/logs/images.log" 2>&1 || { cat "${DIR}/logs/images.log" >&2; fail "building the pause image with umoci failed"; }
}

# The host directories that must exist to be covered by a tmpfs. Several nodes may run on
# one machine (each in its own DIR), so the ones created here are recorded machine-wide,
# every running node holds a shared lock on USERS_LOCK (its namespace's holder keeps it
# open), and the last node to stop removes them.
prepare_host_paths() {
  local p
  mkdir -p "${SHARED}"
  # held until this node's holder has its shared lock (start_namespace)
  exec 7>>"${SHARED}/host-dirs.lock"
  flock 7
  for p in "${HOST_PATHS[@]}"; do
    if [[ ! -e "${p}" ]]; then
      # the topmost missing ancestor first, so that the whole chain is removed again
      local missing=() q="${p}"
      while [[ ! -e "${q}" ]]; do missing=("${q}" "${missing[@]}"); q="$(dirname "${q}")"; done
      mkdir -p "${p}"
      printf '%s\n' "${missing[@]}" >>"${SHARED}/host-dirs"
    fi
  done
}

# After this node's processes are gone: if no other node runs, remove the host
# directories nodes created.
remove_host_paths() {
  local p
  [[ -f "${SHARED}/host-dirs" ]] || return 0
  exec 7>>"${SHARED}/host-dirs.lock"
  flock 7
  if flock -n -x "${USERS_LOCK}" true; then
    # deepest first
    sort -r -u "${SHARED}/host-dirs" | while read -r p; do
      if [[ -n "${p}" ]]; then rmdir "${p}" 2>/dev/null || true; fi
    done
    rm -f "${SHARED}/host-dirs"
  fi
  exec 7>&-
}

start_namespace() {
  local pid
  pid="$(pid_of ns)"
  if alive "${pid}"; then exec 7>&-; return 0; fi
  # The holder keeps a shared lock on USERS_LOCK for as long as it lives.
  # shellcheck disable=SC2016 # $$ is expanded by the inner shell
  setsid bash -c 'exec 8>>"$1" && flock -s 8 && echo $$ >"$0" && exec unshare --mount --propagation private sleep infinity' \
    "${DIR}/ns.pid" "${USERS_LOCK}" </dev/null >/dev/null 2>&1 7>&- 9>&- &
  disown $!
  local i
  for ((i = 0; i < 50; i++)); do
    pid="$(pid_of ns)"
    if [[ -n "${pid}" && "$(readlink "/proc/${pid}/ns/mnt" 2>/dev/null)" != "$(readlink /proc/self/ns/mnt)" ]] &&
      [[ "$(cat "/proc/${pid}/comm" 2>/dev/null)" == sleep ]]; then
      break
    fi
    sleep 0.1
  done
  [[ "$(cat "/proc/${pid}/comm" 2>/dev/null)" == sleep ]] || fail "could not create a private mount namespace (unshare)"
  MNT_NS="$(readlink "/proc/${pid}/ns/mnt")"
  BOOT_ID="$(cat /proc/sys/kernel/random/boot_id)"
  printf 'MNT_NS=%q\nBOOT_ID=%q\n' "${MNT_NS}" "${BOOT_ID}" >>"${DIR}/state.env"
  local p kv k v
  for p in "${HOST_PATHS[@]}"; do
    in_ns mount -n -t tmpfs -o mode=0755,size=64m pullkeeper-node "${p}" || fail "mount tmpfs on ${p} in the node's namespace failed"
  done
  mkdir -p "${DIR}/sysctl"
  for kv in "${SYSCTLS[@]}"; do
    k="${kv%%=*}" v="${kv#*=}"
    printf '%s\n' "${v}" >"${DIR}/sysctl/${k//\//.}"
    in_ns mount -n --bind "${DIR}/sysctl/${k//\//.}" "/proc/sys/${k}" || fail "bind-mounting over /proc/sys/${k} failed"
  done
  exec 7>&-
}

# Create the kubelet's cgroup root in every v1 hierarchy (it must exist before the kubelet
# starts); cpuset needs its cpus and mems filled in before anything can join it.
make_cgroup_root() {
  local h
  [[ -f /sys/fs/cgroup/cgroup.controllers ]] && { mkdir -p "/sys/fs/cgroup/${CGROUP_NAME}"; return 0; }
  for h in /sys/fs/cgroup/*/; do
    h="${h%/}"
    [[ -d "${h}" && "${h##*/}" != unified ]] || continue
    mkdir -p "${h}/${CGROUP_NAME}"
  done
  if [[ -f /sys/fs/cgroup/cpuset/cpuset.cpus ]]; then
    cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/${CGROUP_NAME}/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/${CGROUP_NAME}/cpuset.mems"
  fi
}

write_containerd_config() {
  mkdir -p "${DIR}/containerd/certs.d" "${DIR}/cni/net.d" "${DIR}/tmp"
  cat >"${DIR}/containerd/config.toml" <<EOF
version = 2
root = "${DIR}/containerd/root"
state = "${DIR}/containerd/state"
[grpc]
  address = "${DIR}/containerd/containerd.sock"
[ttrpc]
  address = "${DIR}/containerd/containerd.sock.ttrpc"
[debug]
  address = "${DIR}/containerd/debug.sock"
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "${DIR}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pullkeeper/pause:1"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # no CAP_SYS_RESOURCE on every machine: never ask for an oom_score_adj below containerd's
  restrict_oom_score_adj = true
  # never load AppArmor profiles into the host's kernel
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "${DIR}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "${DIR}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "${DIR}/containerd/certs.d"
EOF
  # A bridge without an address on the host: pods get addresses and can reach each other,
  # nothing is routed, masqueraded or filtered on the host.
  cat >"${DIR}/cni/net.d/10-pullkeeper.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "pullkeeper-node", "plugins": [
  {"type": "bridge", "bridge": "${BRIDGE}", "isGateway": false, "ipMasq": false, "hairpinMode": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "${SUBNET}"}]], "dataDir": "${DIR}/cni/ipam"}},
  {"type": "loopback"}
]}
EOF
}

start_containerd() {
  if alive "$(pid_of containerd)" && ctr_ version >/dev/null 2>&1; then return 0; fi
  # shellcheck disable=SC2016 # $$ and "$@" are expanded by the inner shell
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "${DIR}/containerd.pid" \
    nsenter -t "$(pid_of ns)" -m -- env TMPDIR="${DIR}/tmp" \
    containerd --config "${DIR}/containerd/config.toml" \
    </dev/null >"${DIR}/logs/containerd.log" 2>&1 9>&- &
  disown $!
  local i
  for ((i = 0; i < 150; i++)); do
    ctr_ version >/dev/null 2>&1 && break
    alive "$(pid_of containerd)" || [[ ! -s "${DIR}/containerd.pid" ]] || fail "containerd exited"
    sleep 0.1
  done
  ctr_ version >/dev/null 2>&1 || fail "containerd did not answer on ${DIR}/containerd/containerd.sock"
  ctr_ -n k8s.io images import "${DIR}/images/pause.tar" >>"${DIR}/logs/images.log" 2>&1 ||
    fail "importing the pause image into containerd failed (log: ${DIR}/logs/images.log)"
}

node_ready() {
  [[ "$(kc get node "${NODE_NAME}" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

start_kubelet() {
  local kubelet port hport
  kubelet="$(bash "${HERE}/control-plane.sh" kubelet | tail -n1)" || fail "could not get a kubelet from hack/control-plane.sh"
  port="$(free_port)"
  hport="$(free_port)"
  mkdir -p "${DIR}/kubelet" "${DIR}/pod-logs"
  cat >"${DIR}/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: ${port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: ${hport}
# Loopback only; lets the apiserver proxy logs and exec without client certificates.
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix://${DIR}/containerd/containerd.sock
# containerd 1.6 has no RuntimeConfig call; must match SystemdCgroup = false
cgroupDriver: cgroupfs
cgroupRoot: /${CGROUP_NAME}
failCgroupV1: false
failSwapOn: false
podLogsDir: ${DIR}/pod-logs
volumePluginDir: ${DIR}/kubelet/volume-plugins
# else the kubelet adds KUBE-FIREWALL and canary chains to the host's iptables
makeIPTablesUtilChains: false
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
maxPods: 50
serializeImagePulls: false
EOF
  printf 'KUBELET_PORT=%q\nKUBELET_HEALTHZ_PORT=%q\n' "${port}" "${hport}" >>"${DIR}/state.env"
  # shellcheck disable=SC2016 # $$ and "$@" are expanded by the inner shell
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "${DIR}/kubelet.pid" \
    nsenter -t "$(pid_of ns)" -m -- "${kubelet}" \
    --config="${DIR}/kubelet.yaml" \
    --kubeconfig="${DIR}/kubeconfig" \
    --root-dir="${DIR}/kubelet" \
    --cert-dir="${DIR}/kubelet/pki" \
    --hostname-override="${NODE_NAME}" \
    --v=2 </dev/null >"${DIR}/logs/kubelet.log" 2>&1 9>&- &
  disown $!
  local deadline=$((SECONDS + TIMEOUT))
  until node_ready; do
    sleep 0.5
    alive "$(pid_of kubelet)" || [[ ! -s "${DIR}/kubelet.pid" ]] || fail "the kubelet exited"
    ((SECONDS < deadline)) || fail "node ${NODE_NAME} not Ready after ${TIMEOUT}s"
  done
}

# Fail if another kubelet (another DIR) serves a node of this name for this control plane.
# The control plane listens on loopback only, so such a kubelet runs on this machine.
another_kubelet() {
  local server p args other
  server="$(awk '$1 == "server:" {print $2; exit}' "$1")"
  for p in /proc/[0-9]*; do
    args="$(tr '\0' '\n' 2>/dev/null <"${p}/cmdline")" || continue
    grep -qx -- "--hostname-override=${NODE_NAME}" <<<"${args}" || continue
    other="$(sed -n 's/^--kubeconfig=//p' <<<"${args}" | head -n1)"
    [[ -n "${other}" && "${other}" != "${DIR}/kubeconfig" && -r "${other}" ]] || continue
    if [[ "$(awk '$1 == "server:" {print $2; exit}' "${other}")" == "${server}" ]]; then
      log "error: another kubelet (pid ${p#/proc/}, ${other}) serves node ${NODE_NAME} for ${server}; stop it first (hack/node.sh stop $(dirname "${other}"))"
      exit 1
    fi
  done
}

healthy() {
  load_state || return 1
  alive "$(our_pid ns)" && alive "$(our_pid containerd)" && alive "$(our_pid kubelet)" &&
    [[ "$(curl -fsS --max-time 2 "http://127.0.0.1:${KUBELET_HEALTHZ_PORT:-0}/healthz" 2>/dev/null)" == ok ]] &&
    node_ready
}

cmd_start() {
  local kubeconfig="$1"
  [[ "$(id -u)" == 0 ]] || { log "error: the node needs root"; exit 1; }
  [[ -r "${kubeconfig}" ]] || { log "error: cannot read kubeconfig ${kubeconfig}"; exit 1; }
  ensure_packages
  mkdir -p "${DIR}/logs"
  exec 9>"${DIR}/.lock"
  flock 9
  KUBECTL="$(bash "${HERE}/control-plane.sh" kubectl | tail -n1)" || { log "error: no kubectl"; exit 1; }
  printf '%s\n' "${PULLKEEPER_NODE_OWNER:-}" >"${DIR}/owner"
  if cmp -s "${kubeconfig}" "${DIR}/kubeconfig" && healthy; then
    log "node ${NODE_NAME} in ${DIR} is already running"
    printf '%s\n' "${NODE_NAME}"
    return 0
  fi
  # Leftovers of a dead or half-started node, or one registered with another control plane.
  stop_all
  another_kubelet "${kubeconfig}"
  derive_names
  cp "${kubeconfig}" "${DIR}/kubeconfig"
  chmod 600 "${DIR}/kubeconfig"
  {
    printf 'BRIDGE=%q\nCGROUP_NAME=%q\nSUBNET=%q\n' "${BRIDGE}" "${CGROUP_NAME}" "${SUBNET}"
    printf 'KUBECTL=%q\n' "${KUBECTL}"
  } >"${DIR}/state.env"
  local t0=${SECONDS}
  STARTING=1
  build_images
  prepare_host_paths
  start_namespace
  make_cgroup_root
  write_containerd_config
  start_containerd
  start_kubelet
  STARTING=0
  log "node ${NODE_NAME} Ready in $((SECONDS - t0))s (kubelet pid $(pid_of kubelet), logs in ${DIR}/logs)"
  printf '%s\n' "${NODE_NAME}"
}

# ---------------------------------------------------------------------------
# stop

# PIDs of the processes whose mount namespace is the node's.
ns_pids() {
  this_boot || return 0
  local p
  for p in /proc/[0-9]*; do
    [[ "$(readlink "${p}/ns/mnt" 2>/dev/null)" == "${MNT_NS}" ]] && printf '%s\n' "${p#/proc/}"
  done
  return 0
}

# PIDs in the node's cgroup root (containers, sandboxes), in any hierarchy.
cgroup_pids() {
  [[ -n "${CGROUP_NAME:-}" ]] || return 0
  local f
  find /sys/fs/cgroup -path "*/${CGROUP_NAME}*" -name cgroup.procs 2>/dev/null | while read -r f; do
    cat "${f}" 2>/dev/null || true
  done | sort -u
}

stop_pid() { # stop_pid PID: TERM, up to 10 s, then KILL
  local p="$1" i
  alive "${p}" || return 0
  kill -TERM "${p}" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do alive "${p}" || return 0; sleep 0.1; done
  kill -KILL "${p}" 2>/dev/null || true
}

kill_all() { # kill_all: KILL what is left in the cgroup root and the namespace, until none is
  local i pids
  for ((i = 0; i < 100; i++)); do
    pids="$( { cgroup_pids; ns_pids; } | sort -u | grep -vx "$$" || true)"
    [[ -z "${pids}" ]] && return 0
    # shellcheck disable=SC2086 # one PID per word
    kill -KILL ${pids} 2>/dev/null || true
    sleep 0.1
  done
  log "warning: processes survived SIGKILL: ${pids//$'\n'/ }"
}

remove_cgroups() {
  [[ -n "${CGROUP_NAME:-}" ]] || return 0
  local d i
  for ((i = 0; i < 50; i++)); do
    find /sys/fs/cgroup -maxdepth 2 -type d -name "${CGROUP_NAME}" 2>/dev/null | while read -r d; do
      find "${d}" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    [[ -z "$(find /sys/fs/cgroup -maxdepth 2 -type d -name "${CGROUP_NAME}" 2>/dev/null)" ]] && return 0
    sleep 0.1
  done
  log "warning: could not remove the cgroups $(find /sys/fs/cgroup -maxdepth 2 -type d -name "${CGROUP_NAME}" | tr '\n' ' ')"
}

# Without state.env (removed by hand while the node ran), find the node's mount namespace
# through its containerd or kubelet, whose command lines name DIR.
recover_state() {
  local p args
  [[ -n "${CGROUP_NAME:-}" ]] || derive_names
  [[ -n "${MNT_NS:-}" ]] && return 0
  for p in /proc/[0-9]*; do
    args="$(tr '\0' ' ' 2>/dev/null <"${p}/cmdline")" || continue
    if [[ "${args}" == *"--config ${DIR}/containerd/config.toml"* || "${args}" == *"--root-dir=${DIR}/kubelet "* ]] &&
      [[ "$(readlink "${p}/ns/mnt" 2>/dev/null)" != "$(readlink /proc/self/ns/mnt)" ]]; then
      MNT_NS="$(readlink "${p}/ns/mnt")"
      BOOT_ID="$(cat /proc/sys/kernel/random/boot_id)"
      return 0
    fi
  done
}

stop_all() {
  load_state || true
  recover_state
  KUBECTL="${KUBECTL:-$(bash "${HERE}/control-plane.sh" kubectl 2>/dev/null | tail -n1 || true)}"
  stop_pid "$(our_pid kubelet)"
  # Containers first (they are not in the namespace: runc gives each its own), then
  # containerd and its shims, then the namespace's holder.
  local p
  for p in $(cgroup_pids); do kill -KILL "${p}" 2>/dev/null || true; done
  stop_pid "$(our_pid containerd)"
  kill_all
  rm -f "${DIR}/kubelet.pid" "${DIR}/containerd.pid" "${DIR}/ns.pid"
  remove_cgroups
  # The pods bound to this node would otherwise stay Terminating, or be started again by the
  # next node of this name.
  if [[ -n "${MNT_NS:-}" && -x "${KUBECTL:-}" && -f "${DIR}/kubeconfig" ]] && kc get node "${NODE_NAME}" >/dev/null 2>&1; then
    kc delete pods -A --field-selector "spec.nodeName=${NODE_NAME}" --force --grace-period=0 >/dev/null 2>&1 || true
    kc delete node "${NODE_NAME}" --wait=false >/dev/null 2>&1 || true
  fi
  if [[ -n "${BRIDGE:-}" ]] && ip link show "${BRIDGE}" >/dev/null 2>&1; then
    ip link del "${BRIDGE}" || log "warning: could not delete the bridge ${BRIDGE}"
  fi
  remove_host_paths
  # The namespace is gone, and with it every mount; only then remove the state.
  if grep -qF " ${DIR}/" /proc/self/mountinfo; then
    log "warning: mounts under ${DIR} remain; keeping its state"
  else
    rm -rf "${DIR}/containerd" "${DIR}/kubelet" "${DIR}/pod-logs" "${DIR}/runc" "${DIR}/cni" \
      "${DIR}/sysctl" "${DIR}/tmp" "${DIR}/kubelet.yaml" "${DIR}/kubectl-cache"
  fi
  rm -f "${DIR}/state.env"
  MNT_NS="" BOOT_ID="" CGROUP_NAME="" BRIDGE=""
}

cmd_stop() {
  local owner="${1:-}"
  [[ -d "${DIR}" ]] || return 0
  exec 9>"${DIR}/.lock"
  flock 9
  if [[ -n "${owner}" && "$(cat "${DIR}/owner" 2>/dev/null)" != "${owner}" ]]; then
    log "node in ${DIR} belongs to another process now; left running"
    return 0
  fi
  stop_all
  rm -f "${DIR}/owner"
  log "node in ${DIR} stopped"
}

cmd_status() {
  KUBECTL=""
  if ! load_state; then
    echo "not running"
    return 1
  fi
  local name
  for name in ns containerd kubelet; do
    if alive "$(our_pid "${name}")"; then echo "${name}: pid $(our_pid "${name}")"; else echo "${name}: not running"; fi
  done
  if healthy; then
    echo "node ${NODE_NAME}: Ready"
  else
    echo "node ${NODE_NAME}: not Ready"
    return 1
  fi
}

cmd_trust() {
  local host="$1" ca="${2:-}" d scheme=http ca_line=""
  [[ "${host}" =~ ^[A-Za-z0-9.-]+(:[0-9]+)?$ ]] || { log "error: not HOST:PORT: ${host}"; exit 2; }
  d="${DIR}/containerd/certs.d/${host}"
  mkdir -p "${d}"
  if [[ -n "${ca}" ]]; then
    cp "${ca}" "${d}/ca.crt"
    scheme=https
    ca_line="  ca = \"${d}/ca.crt\""
  fi
  printf 'server = "%s://%s"\n\n[host."%s://%s"]\n  capabilities = ["pull", "resolve"]\n%s\n' \
    "${scheme}" "${host}" "${scheme}" "${host}" "${ca_line}" >"${d}/hosts.toml.$$"
  mv -f "${d}/hosts.toml.$$" "${d}/hosts.toml"
}

main() {
  (($# >= 2)) || usage
  local cmd="$1"
  DIR="$(realpath -m -- "$2")"
  case "${cmd}" in
    start) (($# == 3)) || usage; cmd_start "$(realpath -m -- "$3")" ;;
    stop) (($# == 2 || $# == 3)) || usage; cmd_stop "${3:-}" ;;
    status) (($# == 2)) || usage; cmd_status ;;
    trust) (($# == 3 || $# == 4)) || usage; cmd_trust "$3" "${4:-}" ;;
    *) usage ;;
  esac
}

main "$@"; exit
