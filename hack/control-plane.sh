#!/usr/bin/env bash
# Bring up a real, local Kubernetes control plane (etcd + kube-apiserver +
# kube-controller-manager) on loopback, for integration tests.
#
# Usage:
#   hack/control-plane.sh install      ensure the binaries exist; the last line of
#                                      stdout is the directory holding kube-apiserver,
#                                      kube-controller-manager and etcd (and, for the
#                                      Go-module build, kubelet and kubectl)
#   hack/control-plane.sh kubectl      ensure kubelet and kubectl of the server's version
#   hack/control-plane.sh kubelet      exist (built once, see Binaries); the last line of
#                                      stdout is the path of the one asked for
#   hack/control-plane.sh start DIR    start (or reuse) a control plane whose state lives
#                                      in DIR; the last line of stdout is DIR/kubeconfig
#   hack/control-plane.sh stop DIR     stop it and remove its data (idempotent)
#   hack/control-plane.sh restart-apiserver DIR
#                                      start its kube-apiserver again in place (same port,
#                                      certificates and etcd data) after it was killed;
#                                      the last line of stdout is DIR/kubeconfig
#   hack/control-plane.sh env DIR      print `export KUBECONFIG=...`
#
#   install, kubectl and kubelet are hack/k8s-binaries.sh's (building the binaries), kept
#   here for convenience.
#
# Environment knobs (and those of hack/k8s-binaries.sh, for the binaries):
#   PULLKEEPER_CACHE_DIR        cache root (default ${XDG_CACHE_HOME:-~/.cache}/pullkeeper)
#   PULLKEEPER_CP_TIMEOUT       seconds to wait for the control plane (default 180)
#
# Files in DIR (tests may add lines to tokens.csv before `start`; the apiserver reads
# it only at start-up): kubeconfig, controller-manager.kubeconfig, tokens.csv,
# pki/{ca.crt,ca.key,apiserver.crt,apiserver.key,sa.key}, etcd/, *.log, *.pid, state.env.

# Several functions are only called indirectly (wait_for DESCRIPTION LOG PID COMMAND...).
# shellcheck disable=SC2317

set -euo pipefail

readonly PROG="${0##*/}"
SELF="$(realpath -- "${BASH_SOURCE[0]}")"
readonly SELF
HERE="$(dirname -- "${SELF}")"
# shellcheck source=hack/lib/common.sh
source "${HERE}/lib/common.sh"

CACHE_ROOT="${PULLKEEPER_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME}/.cache}/pullkeeper}"
TIMEOUT="${PULLKEEPER_CP_TIMEOUT:-180}"

# File descriptors used for locks; closed in every daemon we launch.
readonly FD_PORTS=7 FD_DIR=8

BIN_DIR=""      # from hack/k8s-binaries.sh

usage() {
  cat >&2 <<EOF
usage: ${PROG} install
       ${PROG} kubectl|kubelet
       ${PROG} start DIR
       ${PROG} stop DIR
       ${PROG} restart-apiserver DIR
       ${PROG} env DIR
EOF
  exit 2
}

# ---------------------------------------------------------------------------
# start / stop

has_binaries() {
  local d="$1"
  [[ -n "${d}" && -x "${d}/kube-apiserver" && -x "${d}/kube-controller-manager" && -x "${d}/etcd" ]]
}

abs_dir() { # absolute path of $1 without requiring that it exists
  realpath -m -- "$1"
}

# Is PID alive and running the binary NAME (as argv[0], or argv[1] for wrapper scripts)?
pid_is() {
  local pid="$1" name="$2" args
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
  kill -0 "${pid}" 2>/dev/null || return 1
  args="$(head -z -n2 "/proc/${pid}/cmdline" 2>/dev/null | tr '\0' '\n')" || return 1
  local a
  while IFS= read -r a; do
    [[ "${a##*/}" == "${name}" ]] && return 0
  done <<<"${args}"
  return 1
}

read_pid() { # read_pid DIR NAME
  local f="$1/$2.pid"
  [[ -f "${f}" ]] && tr -dc '0-9' <"${f}"
  return 0
}

# Port in use (listening) on 127.0.0.1 or any address?
port_in_use() {
  local p="$1"
  if command -v ss >/dev/null 2>&1; then
    ss -Htan "sport = :${p}" 2>/dev/null | grep -q . && return 0
    return 1
  fi
  (exec 3<>"/dev/tcp/127.0.0.1/${p}") 2>/dev/null
}

# Print N distinct free ports between 20000 and 32767 (below the usual ephemeral range).
pick_ports() {
  local n="$1" picked=() p tries=0
  while ((${#picked[@]} < n)); do
    tries=$((tries + 1))
    ((tries < 1000)) || die "could not find ${n} free loopback ports"
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 12768))
    [[ " ${picked[*]-} " == *" ${p} "* ]] && continue
    port_in_use "${p}" && continue
    picked+=("${p}")
  done
  printf '%s\n' "${picked[@]}"
}

port_listening() {
  ss -Htln "sport = :$1" 2>/dev/null | grep -q . ||
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Launch a daemon fully detached: own session, stdin from /dev/null, output to LOG,
# lock fds closed; its pid is written to PIDFILE by the shell that execs it.
launch() {
  local pidfile="$1" logfile="$2"
  shift 2
  printf '+ %s\n' "$*" >"${logfile}"
  # shellcheck disable=SC2016 # $$ and "$@" are expanded by the inner shell
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "${pidfile}" "$@" \
    </dev/null >>"${logfile}" 2>&1 7>&- 8>&- 9>&- &
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s "${pidfile}" ]] && return 0
    sleep 0.1
  done
  die "could not launch $1 (no pid file ${pidfile})"
}

# curl the apiserver as admin: api_get PATH -> body on stdout, fails on HTTP errors
api_get() {
  curl -fsS --max-time 5 --cacert "${DIR}/pki/ca.crt" \
    -H "Authorization: Bearer ${ADMIN_TOKEN}" "https://127.0.0.1:${APISERVER_PORT}$1"
}

load_state() {
  [[ -f "${DIR}/state.env" ]] || return 1
  # shellcheck source=/dev/null
  source "${DIR}/state.env"
  [[ -n "${APISERVER_PORT:-}" && -n "${ADMIN_TOKEN:-}" ]]
}

# Is the control plane recorded in DIR running and ready?
healthy() {
  load_state || return 1
  pid_is "$(read_pid "${DIR}" etcd)" etcd || return 1
  pid_is "$(read_pid "${DIR}" kube-apiserver)" kube-apiserver || return 1
  pid_is "$(read_pid "${DIR}" kube-controller-manager)" kube-controller-manager || return 1
  [[ "$(api_get /readyz 2>/dev/null)" == ok ]]
}

# Send SIGNAL to PID's process group if PID leads one (our daemons do: setsid),
# else to PID alone.
signal_daemon() {
  local sig="$1" pid="$2" stat rest pgrp
  stat="$(cat "/proc/${pid}/stat" 2>/dev/null)" || return 0
  rest="${stat##*) }"
  read -r _ _ pgrp _ <<<"${rest}"
  if [[ "${pgrp}" == "${pid}" ]]; then
    kill "-${sig}" -- "-${pid}" 2>/dev/null || true
  else
    kill "-${sig}" "${pid}" 2>/dev/null || true
  fi
}

stop_processes() {
  local name pid i any=0
  local -a pids=()
  for name in kube-controller-manager kube-apiserver etcd; do
    pid="$(read_pid "${DIR}" "${name}")"
    if [[ -n "${pid}" ]] && pid_is "${pid}" "${name}"; then
      signal_daemon TERM "${pid}"
      pids+=("${pid}:${name}")
      any=1
    fi
    rm -f "${DIR}/${name}.pid"
  done
  ((any)) || return 0
  for ((i = 0; i < 100; i++)); do
    local alive=0 e
    for e in "${pids[@]}"; do
      pid_is "${e%%:*}" "${e#*:}" && alive=1
    done
    ((alive)) || return 0
    sleep 0.1
  done
  for e in "${pids[@]}"; do
    if pid_is "${e%%:*}" "${e#*:}"; then
      log "${e#*:} (pid ${e%%:*}) did not stop in 10s; sending SIGKILL"
      signal_daemon KILL "${e%%:*}"
    fi
  done
  for ((i = 0; i < 50; i++)); do
    local alive=0 e
    for e in "${pids[@]}"; do
      pid_is "${e%%:*}" "${e#*:}" && alive=1
    done
    ((alive)) || return 0
    sleep 0.1
  done
  log "warning: some processes survived SIGKILL"
}

remove_data() {
  rm -rf "${DIR}/etcd" "${DIR}/pki" "${DIR}/kcm-certs"
  rm -f "${DIR}/kubeconfig" "${DIR}/controller-manager.kubeconfig" "${DIR}/state.env"
}

# Write a kubeconfig: write_kubeconfig FILE PORT TOKEN USER
write_kubeconfig() {
  local file="$1" port="$2" token="$3" user="$4" ca
  ca="$(base64 -w0 <"${DIR}/pki/ca.crt")"
  (umask 077 && cat >"${file}.tmp") <<EOF
apiVersion: v1
kind: Config
clusters:
- name: pullkeeper-test
  cluster:
    server: https://127.0.0.1:${port}
    certificate-authority-data: ${ca}
users:
- name: ${user}
  user:
    token: ${token}
contexts:
- name: pullkeeper-test
  context:
    cluster: pullkeeper-test
    user: ${user}
    namespace: default
current-context: pullkeeper-test
EOF
  mv -f "${file}.tmp" "${file}"
}

gen_pki() {
  local pki="${DIR}/pki"
  rm -rf "${pki}"
  mkdir -p "${pki}"
  chmod 700 "${pki}"
  (
    cd "${pki}"
    openssl req -x509 -new -nodes -newkey rsa:2048 -sha256 -days 3650 \
      -keyout ca.key -out ca.crt -subj "/CN=pullkeeper-test-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
    openssl req -new -nodes -newkey rsa:2048 -sha256 \
      -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    printf '%s\n' \
      "basicConstraints=CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" \
      "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
      >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -sha256 -days 3650 \
      -set_serial "0x$(openssl rand -hex 16)" -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    rm -f apiserver.csr apiserver.ext
  ) || die "generating certificates and keys with openssl failed"
}

# tokens.csv: keep lines that tests added, (re)write the admin and controller-manager ones.
write_tokens() {
  local f="${DIR}/tokens.csv" tmp="${DIR}/tokens.csv.tmp"
  : >"${tmp}"
  if [[ -f "${f}" ]]; then
    awk -F, '$2 != "admin" && $2 != "system:kube-controller-manager"' "${f}" >"${tmp}"
  fi
  printf '%s,admin,admin-uid,"system:masters"\n' "${ADMIN_TOKEN}" >>"${tmp}"
  printf '%s,system:kube-controller-manager,kube-controller-manager-uid\n' "${KCM_TOKEN}" >>"${tmp}"
  chmod 600 "${tmp}"
  mv -f "${tmp}" "${f}"
}

# The --controllers value: everything except the node, route, service-LB, attach-detach,
# cloud, PV and TTL controllers, using the names this kube-controller-manager knows.
kcm_controllers() {
  local help names disabled=() n
  help="$("${BIN_DIR}/kube-controller-manager" --help 2>&1 || true)"
  names="$(awk '/--controllers/ {on = 1} on && /All controllers:/ {grab = 1} grab {print} grab && /Disabled-by-default/ {exit}' <<<"${help}" |
    sed -e 's/.*All controllers://' -e 's/Disabled-by-default.*//' | tr ',' '\n' | tr -d ' \t' | grep -v '^$' || true)"
  [[ -n "${names}" ]] || die "could not read the controller names from kube-controller-manager --help"
  for n in ${names}; do
    case "${n}" in
      nodeipam|node-ipam-controller|nodelifecycle|node-lifecycle-controller|\
      cloud-node-lifecycle|cloud-node-lifecycle-controller|route|node-route-controller|\
      service|service-lb-controller|attachdetach|attach-detach-controller|\
      persistentvolume-attach-detach-controller|\
      persistentvolume-binder|persistentvolume-binder-controller|\
      persistentvolume-expander|persistentvolume-expander-controller|\
      ttl|ttl-controller|taint-eviction-controller)
        disabled+=("-${n}") ;;
    esac
  done
  local IFS=,
  printf '*,%s\n' "${disabled[*]}"
}

wait_for() { # wait_for DESCRIPTION LOGFILE PIDNAME COMMAND...
  local what="$1" logfile="$2" pname="$3"
  shift 3
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if ! pid_is "$(read_pid "${DIR}" "${pname}")" "${pname}"; then
      log "${pname} exited while waiting for ${what}"
      tail_log "${logfile}" 40
      stop_processes
      die "control plane in ${DIR} failed to start (${pname} died; full log: ${logfile})"
    fi
    if ((SECONDS >= deadline)); then
      log "timed out after ${TIMEOUT}s waiting for ${what}"
      tail_log "${logfile}" 40
      stop_processes
      die "control plane in ${DIR} failed to start (timeout; full log: ${logfile})"
    fi
    sleep 0.5
  done
}

readyz_ok() { [[ "$(api_get /readyz)" == ok ]]; }
default_sa_exists() { api_get /api/v1/namespaces/default/serviceaccounts/default; }

# Launch kube-apiserver on the ports and files recorded in DIR (state.env, pki/, tokens.csv):
# by `start`, and again by `restart-apiserver` after the process was killed.
launch_apiserver() {
  local minor="$1"
  local api_args=(
    --etcd-servers="http://127.0.0.1:${ETCD_CLIENT_PORT}"
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1
    --secure-port="${APISERVER_PORT}" --cert-dir="${DIR}/pki"
    --tls-cert-file="${DIR}/pki/apiserver.crt" --tls-private-key-file="${DIR}/pki/apiserver.key"
    --client-ca-file="${DIR}/pki/ca.crt"
    --token-auth-file="${DIR}/tokens.csv" --authorization-mode=RBAC
    --service-account-issuer=https://kubernetes.default.svc
    --service-account-key-file="${DIR}/pki/sa.key"
    --service-account-signing-key-file="${DIR}/pki/sa.key"
    --service-cluster-ip-range=10.0.0.0/24
    --endpoint-reconciler-type=none
    --allow-privileged=true --profiling=false
  )
  if ((minor < 24)); then
    api_args+=(--insecure-port=0)
  fi
  launch "${DIR}/kube-apiserver.pid" "${DIR}/kube-apiserver.log" "${BIN_DIR}/kube-apiserver" "${api_args[@]}"
}

cmd_start() {
  DIR="$(abs_dir "$1")"
  ensure_tools openssl:openssl curl:curl flock:util-linux setsid:util-linux realpath:coreutils \
    base64:coreutils awk:mawk sed:sed head:coreutils
  mkdir -p "${DIR}"
  take_lock "${FD_DIR}" "${DIR}/.lock" "control plane ${DIR}"

  if healthy; then
    log "control plane in ${DIR} is already running (https://127.0.0.1:${APISERVER_PORT})"
    printf '%s\n' "${DIR}/kubeconfig"
    return 0
  fi
  # Leftovers of a dead or half-started control plane.
  stop_processes
  remove_data

  BIN_DIR="$(bash "${HERE}/k8s-binaries.sh" install | tail -n1)" || die "no Kubernetes binaries (see the output of hack/k8s-binaries.sh above)"
  has_binaries "${BIN_DIR}" || die "hack/k8s-binaries.sh gave no binaries in '${BIN_DIR}'"
  local t0=${SECONDS} version minor
  version="$("${BIN_DIR}/kube-apiserver" --version 2>/dev/null | awk '{print $2}')"
  minor="${version#v1.}"
  minor="${minor%%.*}"
  [[ "${minor}" =~ ^[0-9]+$ ]] || die "could not parse the version of ${BIN_DIR}/kube-apiserver: '${version}'"
  log "starting Kubernetes ${version} control plane in ${DIR} (binaries: ${BIN_DIR})"

  gen_pki
  ADMIN_TOKEN="$(openssl rand -hex 24)"
  KCM_TOKEN="$(openssl rand -hex 24)"
  write_tokens

  # Ports are picked and held under a global lock until the daemons listen on them,
  # so that concurrent starts in different directories do not collide.
  take_lock "${FD_PORTS}" "${CACHE_ROOT}/locks/ports.lock" "port allocation"
  local ports
  mapfile -t ports < <(pick_ports 4)
  ETCD_CLIENT_PORT="${ports[0]}" ETCD_PEER_PORT="${ports[1]}"
  APISERVER_PORT="${ports[2]}" KCM_PORT="${ports[3]}"
  {
    printf 'K8S_VERSION=%q\n' "${version}"
    printf 'BIN_DIR=%q\n' "${BIN_DIR}"
    printf 'ETCD_CLIENT_PORT=%q\nETCD_PEER_PORT=%q\n' "${ETCD_CLIENT_PORT}" "${ETCD_PEER_PORT}"
    printf 'APISERVER_PORT=%q\nKCM_PORT=%q\n' "${APISERVER_PORT}" "${KCM_PORT}"
    printf 'ADMIN_TOKEN=%q\n' "${ADMIN_TOKEN}"
  } >"${DIR}/state.env"
  chmod 600 "${DIR}/state.env"

  # etcd
  local etcd_args=(
    --name=default --data-dir="${DIR}/etcd"
    --listen-client-urls="http://127.0.0.1:${ETCD_CLIENT_PORT}"
    --advertise-client-urls="http://127.0.0.1:${ETCD_CLIENT_PORT}"
    --listen-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}"
    --initial-advertise-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}"
    --initial-cluster="default=http://127.0.0.1:${ETCD_PEER_PORT}"
    --initial-cluster-state=new --log-level=warn
  )
  if "${BIN_DIR}/etcd" --help 2>&1 | grep -q -- '--unsafe-no-fsync'; then
    etcd_args+=(--unsafe-no-fsync)
  fi
  launch "${DIR}/etcd.pid" "${DIR}/etcd.log" "${BIN_DIR}/etcd" "${etcd_args[@]}"
  wait_for "etcd to listen on 127.0.0.1:${ETCD_CLIENT_PORT}" "${DIR}/etcd.log" etcd \
    curl -fsS --max-time 2 "http://127.0.0.1:${ETCD_CLIENT_PORT}/health"

  launch_apiserver "${minor}"
  # The controller-manager needs the RBAC bootstrap policy, so wait for /readyz first.
  write_kubeconfig "${DIR}/kubeconfig" "${APISERVER_PORT}" "${ADMIN_TOKEN}" admin
  wait_for "kube-apiserver /readyz on 127.0.0.1:${APISERVER_PORT}" "${DIR}/kube-apiserver.log" kube-apiserver readyz_ok

  # kube-controller-manager
  write_kubeconfig "${DIR}/controller-manager.kubeconfig" "${APISERVER_PORT}" "${KCM_TOKEN}" system:kube-controller-manager
  mkdir -p "${DIR}/kcm-certs"
  local kcm_args=(
    --kubeconfig="${DIR}/controller-manager.kubeconfig"
    --authentication-kubeconfig="${DIR}/controller-manager.kubeconfig"
    --authorization-kubeconfig="${DIR}/controller-manager.kubeconfig"
    --bind-address=127.0.0.1 --secure-port="${KCM_PORT}" --cert-dir="${DIR}/kcm-certs"
    --leader-elect=false --use-service-account-credentials=true
    --service-account-private-key-file="${DIR}/pki/sa.key"
    --root-ca-file="${DIR}/pki/ca.crt"
    --cluster-signing-cert-file="${DIR}/pki/ca.crt" --cluster-signing-key-file="${DIR}/pki/ca.key"
    --controllers="$(kcm_controllers)"
    # 20 requests/s (the default) takes eight minutes to give 10,000 namespaces their
    # default ServiceAccount; a benchmark needs them all before it starts.
    --kube-api-qps=200 --kube-api-burst=400
  )
  if ((minor < 24)); then
    kcm_args+=(--port=0)
  fi
  launch "${DIR}/kube-controller-manager.pid" "${DIR}/kube-controller-manager.log" \
    "${BIN_DIR}/kube-controller-manager" "${kcm_args[@]}"
  wait_for "kube-controller-manager to listen on 127.0.0.1:${KCM_PORT}" "${DIR}/kube-controller-manager.log" \
    kube-controller-manager port_listening "${KCM_PORT}"
  release_lock "${FD_PORTS}"

  wait_for "the default ServiceAccount (created by kube-controller-manager)" \
    "${DIR}/kube-controller-manager.log" kube-controller-manager default_sa_exists
  # The apiserver must still be up too.
  healthy || { tail_log "${DIR}/kube-apiserver.log" 40; stop_processes; die "control plane in ${DIR} became unhealthy"; }

  log "control plane ${version} ready in $((SECONDS - t0))s at https://127.0.0.1:${APISERVER_PORT} (logs in ${DIR})"
  printf '%s\n' "${DIR}/kubeconfig"
}

# Start kube-apiserver again in place (same port, certificates, tokens and etcd data)
# after it died or was killed; the rest of the control plane keeps running. For fault
# injection: tests SIGKILL the apiserver and bring it back with this.
cmd_restart_apiserver() {
  DIR="$(abs_dir "$1")"
  take_lock "${FD_DIR}" "${DIR}/.lock" "control plane ${DIR}"
  load_state || die "no control plane recorded in ${DIR}; run '${PROG} start ${DIR}'"
  pid_is "$(read_pid "${DIR}" etcd)" etcd || die "etcd of ${DIR} is not running; run '${PROG} start ${DIR}'"
  local pid version minor
  pid="$(read_pid "${DIR}" kube-apiserver)"
  if [[ -n "${pid}" ]] && pid_is "${pid}" kube-apiserver; then
    signal_daemon KILL "${pid}"
    while pid_is "${pid}" kube-apiserver; do sleep 0.1; done
  fi
  rm -f "${DIR}/kube-apiserver.pid"
  version="${K8S_VERSION:-$("${BIN_DIR}/kube-apiserver" --version 2>/dev/null | awk '{print $2}')}"
  minor="${version#v1.}"
  minor="${minor%%.*}"
  # The old process's port may linger briefly.
  local deadline=$((SECONDS + 30))
  while port_listening "${APISERVER_PORT}"; do
    ((SECONDS < deadline)) || die "port ${APISERVER_PORT} is still in use"
    sleep 0.2
  done
  launch_apiserver "${minor}"
  wait_for "kube-apiserver /readyz on 127.0.0.1:${APISERVER_PORT}" "${DIR}/kube-apiserver.log" kube-apiserver readyz_ok
  log "kube-apiserver of ${DIR} restarted in place at https://127.0.0.1:${APISERVER_PORT}"
  printf '%s\n' "${DIR}/kubeconfig"
}

cmd_stop() {
  DIR="$(abs_dir "$1")"
  [[ -d "${DIR}" ]] || return 0
  need flock
  take_lock "${FD_DIR}" "${DIR}/.lock" "control plane ${DIR}"
  stop_processes
  remove_data
  log "control plane in ${DIR} stopped"
}

cmd_env() {
  DIR="$(abs_dir "$1")"
  printf 'export KUBECONFIG=%q\n' "${DIR}/kubeconfig"
}

main() {
  (($# >= 1)) || usage
  local cmd="$1"
  shift
  case "${cmd}" in
    install|kubectl|kubelet) (($# == 0)) || usage; exec bash "${HERE}/k8s-binaries.sh" "${cmd}" ;;
    start) (($# == 1)) || usage; cmd_start "$1" ;;
    stop) (($# == 1)) || usage; cmd_stop "$1" ;;
    restart-apiserver) (($# == 1)) || usage; cmd_restart_apiserver "$1" ;;
    env) (($# == 1)) || usage; cmd_env "$1" ;;
    -h|--help|help) usage ;;
    *) usage ;;
  esac
}

# On one line, so that editing this file while it runs cannot change what runs.
main "$@"; exit
