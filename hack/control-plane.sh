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
# Binaries:
#   * KUBEBUILDER_ASSETS, if set and holding all three binaries, is used as is.
#   * Otherwise Kubernetes (default v1.36.3) and etcd (default v3.6.14) are built from
#     Go modules with a wrapper module and cached in
#     ~/.cache/pullkeeper/k8s-<version>/bin, together with kubelet and kubectl of the same
#     version. A cache from before kubelet and kubectl were part of it gets just those two
#     built, in the same cached wrapper module. With KUBEBUILDER_ASSETS lacking them, they
#     come from that cache.
#   * If that fails, Kubernetes 1.20.2 is built from Debian's source package (with a
#     fixed reflect2) and Debian's etcd is used, cached in ~/.cache/pullkeeper/k8s-v1.20.2/bin.
#     This needs root for apt-get.
#
# Environment knobs:
#   PULLKEEPER_CACHE_DIR        cache root (default ${XDG_CACHE_HOME:-~/.cache}/pullkeeper)
#   PULLKEEPER_K8S_VERSION      Kubernetes version for the Go-module build (default v1.36.3)
#   PULLKEEPER_ETCD_VERSION     etcd version for the Go-module build (default v3.6.14)
#   PULLKEEPER_CP_ROUTE         auto (default), gomod (no fallback) or debian (fallback only)
#   PULLKEEPER_CP_TIMEOUT       seconds to wait for the control plane (default 180)
#   GO                          go binary (default: go on PATH, else /usr/local/go/bin/go)
#
# Files in DIR (tests may add lines to tokens.csv before `start`; the apiserver reads
# it only at start-up): kubeconfig, controller-manager.kubeconfig, tokens.csv,
# pki/{ca.crt,ca.key,apiserver.crt,apiserver.key,sa.key}, etcd/, *.log, *.pid, state.env.

# Several functions are only called indirectly (run_logged "$@", __build "$1").
# shellcheck disable=SC2317

set -euo pipefail

readonly PROG="${0##*/}"
SELF="$(realpath -- "${BASH_SOURCE[0]}")"
readonly SELF
readonly DEFAULT_K8S_VERSION="v1.36.3"
readonly DEFAULT_ETCD_VERSION="v3.6.14"
readonly FALLBACK_K8S_VERSION="v1.20.2"

CACHE_ROOT="${PULLKEEPER_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME}/.cache}/pullkeeper}"
K8S_VERSION="${PULLKEEPER_K8S_VERSION:-${DEFAULT_K8S_VERSION}}"
ETCD_VERSION="${PULLKEEPER_ETCD_VERSION:-${DEFAULT_ETCD_VERSION}}"
ROUTE="${PULLKEEPER_CP_ROUTE:-auto}"
TIMEOUT="${PULLKEEPER_CP_TIMEOUT:-180}"

# File descriptors used for locks; closed in every daemon we launch.
readonly FD_PORTS=7 FD_DIR=8 FD_INSTALL=9

BIN_DIR=""      # set by ensure_binaries
BUILD_LOG=""    # current build log file

# ---------------------------------------------------------------------------
# helpers

log() { printf '%s: %s\n' "${PROG}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${PROG}" "$*" >&2; exit 1; }

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

need() {
  local c
  for c in "$@"; do
    command -v "${c}" >/dev/null 2>&1 || die "required command '${c}' not found on PATH"
  done
}

# Make sure the commands exist; as root on Debian/Ubuntu, apt-get install what is missing.
# Arguments are command:package pairs.
ensure_tools() {
  local pair missing=() pkgs=()
  for pair in "$@"; do
    if ! command -v "${pair%%:*}" >/dev/null 2>&1; then
      missing+=("${pair%%:*}")
      pkgs+=("${pair#*:}")
    fi
  done
  ((${#missing[@]} == 0)) && return 0
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing missing tools (${missing[*]}) with apt-get: ${pkgs[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2 ||
      die "apt-get install ${pkgs[*]} failed"
  fi
  need "${missing[@]}"
}

# apt-get update, at most once per run (also across the build child process).
apt_update() {
  [[ "${PULLKEEPER_APT_UPDATED:-}" == 1 ]] && return 0
  apt-get update -q >&2 || die "apt-get update failed"
  export PULLKEEPER_APT_UPDATED=1
}

# Take an exclusive lock on FILE with file descriptor FD (waits; says so if it has to).
take_lock() {
  local fd="$1" file="$2" what="$3"
  mkdir -p "$(dirname "${file}")"
  eval "exec ${fd}>\"\${file}\""
  if ! flock -n "${fd}"; then
    log "waiting for ${what} lock (${file})"
    flock "${fd}"
  fi
}

release_lock() {
  local fd="$1"
  eval "exec ${fd}>&-"
}

# Tail a log file to stderr, indented.
tail_log() {
  local file="$1" n="${2:-40}"
  if [[ -s "${file}" ]]; then
    printf -- '----- last %s lines of %s -----\n' "${n}" "${file}" >&2
    tail -n "${n}" "${file}" | sed 's/^/  /' >&2
    printf -- '----- end of %s -----\n' "${file}" >&2
  else
    printf -- '(%s is empty or missing)\n' "${file}" >&2
  fi
}

# Run a command with its output appended to BUILD_LOG; on failure, show the log tail.
run_logged() {
  printf '+ %s\n' "$*" >>"${BUILD_LOG}"
  if ! "$@" >>"${BUILD_LOG}" 2>&1 </dev/null; then
    log "command failed: $*"
    tail_log "${BUILD_LOG}" 30
    return 1
  fi
}

has_binaries() {
  local d="$1"
  [[ -n "${d}" && -x "${d}/kube-apiserver" && -x "${d}/kube-controller-manager" && -x "${d}/etcd" ]]
}

version_ge() { # version_ge A B: A >= B (dotted, optional leading v / go)
  local a="${1#v}" b="${2#v}"
  a="${a#go}"; b="${b#go}"
  [[ "$(printf '%s\n%s\n' "${a}" "${b}" | sort -V | head -n1)" == "${b}" ]]
}

find_go() {
  local g="${GO:-}"
  if [[ -z "${g}" ]]; then
    if command -v go >/dev/null 2>&1; then
      g="$(command -v go)"
    elif [[ -x /usr/local/go/bin/go ]]; then
      g=/usr/local/go/bin/go
    else
      return 1
    fi
  fi
  printf '%s\n' "${g}"
}

# ---------------------------------------------------------------------------
# install: route A (Go modules)

# go with the build environment: caches under CACHE_ROOT, no toolchain downloads.
gocmd() {
  env GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod GOWORK=off \
    GOPATH="${CACHE_ROOT}/go" GOMODCACHE="${CACHE_ROOT}/go/mod" GOCACHE="${CACHE_ROOT}/go/build" \
    "${GO_BIN}" "$@"
}

# Print the value of a string field of JSON read from stdin (`go mod download -json`
# output, .info files); enough for the flat objects the go command writes.
json_field() {
  local field="$1"
  grep -o "\"${field}\"[[:space:]]*:[[:space:]]*\"[^\"]*\"" | head -n1 | sed 's/.*:[[:space:]]*"\(.*\)"$/\1/'
}

# The commands built from the Kubernetes wrapper module.
readonly K8S_COMMANDS=(
  k8s.io/kubernetes/cmd/kube-apiserver
  k8s.io/kubernetes/cmd/kube-controller-manager
  k8s.io/kubernetes/cmd/kubelet
  k8s.io/kubernetes/cmd/kubectl
)

# Write a fresh wrapper module for k8s.io/kubernetes@${K8S_VERSION} into WORK, requiring
# every command of K8S_COMMANDS, and tidy it (downloads the dependencies).
prepare_k8s_module() {
  local work="$1"
  local staging_version="v0.${K8S_VERSION#v1.}"
  rm -rf "${work}"
  mkdir -p "${work}"
  cd "${work}"
  log "step A2: downloading k8s.io/kubernetes@${K8S_VERSION} metadata"
  local dl gomod info go_directive build_date gover
  gover="$(gocmd env GOVERSION 2>>"${BUILD_LOG}")" || { log "'${GO_BIN} env GOVERSION' failed"; return 1; }
  if ! dl="$(gocmd mod download -json "k8s.io/kubernetes@${K8S_VERSION}" 2>>"${BUILD_LOG}")"; then
    printf '%s\n' "${dl}" >>"${BUILD_LOG}"
    log "go mod download k8s.io/kubernetes@${K8S_VERSION} failed"
    tail_log "${BUILD_LOG}" 20
    exit 1
  fi
  gomod="$(json_field GoMod <<<"${dl}" || true)"
  info="$(json_field Info <<<"${dl}" || true)"
  [[ -f "${gomod}" ]] || { log "could not find go.mod of k8s.io/kubernetes@${K8S_VERSION}"; exit 1; }
  cp "${gomod}" upstream.go.mod

  go_directive="$(sed -n 's/^go[[:space:]]\+\([0-9.]*\)[[:space:]]*$/\1/p' upstream.go.mod | head -n1)"
  if [[ -n "${go_directive}" ]] && ! version_ge "${gover}" "${go_directive}"; then
    log "k8s.io/kubernetes@${K8S_VERSION} needs Go ${go_directive}, have ${gover}"
    exit 1
  fi
  build_date="$(json_field Time <"${info}" 2>/dev/null || true)"
  [[ -n "${build_date}" ]] || build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  # Read back by k8s_ldflags, also when only kubelet and kubectl are built later.
  printf '%s\n' "${build_date}" >build-date

  run_logged gocmd mod init pullkeeper.invalid/k8s-build
  if [[ -n "${go_directive}" ]]; then run_logged gocmd mod edit "-go=${go_directive}"; fi
  run_logged gocmd mod edit "-require=k8s.io/kubernetes@${K8S_VERSION}"

  # godebug lines (single-line and block form) only apply in the main module.
  local kv
  while IFS= read -r kv; do
    if [[ -n "${kv}" ]]; then run_logged gocmd mod edit "-godebug=${kv}"; fi
  done < <(awk '
    /^godebug[[:space:]]*\(/ { inblock = 1; next }
    inblock && /^\)/ { inblock = 0; next }
    inblock { sub(/\/\/.*/, ""); gsub(/[[:space:]]/, ""); if ($0 != "") print; next }
    /^godebug[[:space:]]+/ { sub(/^godebug[[:space:]]+/, ""); sub(/\/\/.*/, ""); gsub(/[[:space:]]/, ""); print }
  ' upstream.go.mod)

  # Staging modules: k8s.io/X => ./staging/src/k8s.io/X becomes k8s.io/X => k8s.io/X@v0.N.P.
  local staged required mod n=0
  staged="$(sed -E -n 's#^[[:space:]]*(replace[[:space:]]+)?([^[:space:]]+)([[:space:]]+v[^[:space:]]+)?[[:space:]]+=>[[:space:]]+\./staging/.*#\2#p' upstream.go.mod)"
  required="$(awk '/^require[[:space:]]*\(/ {r=1; next} r && /^\)/ {r=0; next} r {print $1} /^require[[:space:]]+[^(]/ {print $2}' upstream.go.mod)"
  log "step A3: resolving $(wc -w <<<"${staged}") staging modules at ${staging_version}"
  for mod in ${staged}; do
    if gocmd mod download "${mod}@${staging_version}" >>"${BUILD_LOG}" 2>&1; then
      run_logged gocmd mod edit "-replace=${mod}=${mod}@${staging_version}"
      n=$((n + 1))
    elif grep -qxF "${mod}" <<<"${required}"; then
      log "staging module ${mod}@${staging_version} is required but not downloadable"
      tail_log "${BUILD_LOG}" 10
      exit 1
    else
      printf 'note: skipping unused, unavailable staging module %s@%s\n' "${mod}" "${staging_version}" >>"${BUILD_LOG}"
    fi
  done
  log "  ${n} replace directives added"
  write_tools_go
  log "step A4: go mod tidy (downloads dependencies; log: ${BUILD_LOG})"
  run_logged gocmd mod tidy
}

write_tools_go() {
  local c
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for c in "${K8S_COMMANDS[@]}"; do printf '\t_ "%s"\n' "${c}"; done
    printf ')\n'
  } >tools.go
}

# -ldflags stamping the version into the binaries built in the wrapper module WORK.
k8s_ldflags() {
  local work="$1" minor_patch="${K8S_VERSION#v1.}" build_date pkg ldflags="-s -w"
  build_date="$(cat "${work}/build-date" 2>/dev/null || true)"
  [[ -n "${build_date}" ]] || build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor_patch%%.*}"
    ldflags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=${build_date}"
  done
  printf '%s\n' "${ldflags}"
}

# Build only kubelet and kubectl into $1, in the cached wrapper module when it is still
# there (its packages are then mostly compiled already), else in a fresh one.
build_node_tools() {
  local out="$1"
  local work="${CACHE_ROOT}/build/gomod-k8s-${K8S_VERSION}"
  GO_BIN="$(find_go)" || { log "no Go toolchain found (set GO=/path/to/go)"; return 1; }
  if [[ -f "${work}/go.mod" ]] && grep -q "k8s.io/kubernetes ${K8S_VERSION}" "${work}/go.mod"; then
    cd "${work}"
    log "step N1: adding kubelet and kubectl to the cached wrapper module ${work}"
    if [[ ! -s build-date ]]; then
      json_field Time <"${CACHE_ROOT}/go/mod/cache/download/k8s.io/kubernetes/@v/${K8S_VERSION}.info" \
        >build-date 2>/dev/null || true
    fi
    write_tools_go
    run_logged gocmd mod tidy
  else
    prepare_k8s_module "${work}"
  fi
  log "step N2: go build kubelet kubectl"
  run_logged gocmd build -trimpath -ldflags "$(k8s_ldflags "${work}")" -o "${out}/" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl
  local v
  v="$("${out}/kubelet" --version 2>&1)" || { log "kubelet --version failed: ${v}"; return 1; }
  [[ "${v}" == "Kubernetes ${K8S_VERSION}" ]] || { log "unexpected kubelet version: '${v}'"; return 1; }
  v="$("${out}/kubectl" version --client 2>&1)" || { log "kubectl version --client failed: ${v}"; return 1; }
  [[ "${v}" == *"Client Version: ${K8S_VERSION}"* ]] || { log "unexpected kubectl version: '${v}'"; return 1; }
}

# Build Kubernetes ${K8S_VERSION} and etcd ${ETCD_VERSION} into $1 (a bin directory).
build_gomod() {
  local out="$1"
  local work="${CACHE_ROOT}/build/gomod-k8s-${K8S_VERSION}"
  local etcd_work="${CACHE_ROOT}/build/gomod-etcd-${ETCD_VERSION}"

  GO_BIN="$(find_go)" || { log "no Go toolchain found (set GO=/path/to/go)"; return 1; }
  if [[ ! -s /etc/ssl/certs/ca-certificates.crt && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing ca-certificates (needed to reach the Go module proxy)"
    apt_update
    run_logged env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates
  fi
  local gover
  gover="$(gocmd env GOVERSION 2>>"${BUILD_LOG}")" || { log "'${GO_BIN} env GOVERSION' failed"; return 1; }
  log "step A1: using ${GO_BIN} (${gover}); module cache ${CACHE_ROOT}/go"

  # --- Kubernetes wrapper module -------------------------------------------
  prepare_k8s_module "${work}"
  cd "${work}"
  log "step A5: go build kube-apiserver kube-controller-manager kubelet kubectl (the slow part)"
  run_logged gocmd build -trimpath -ldflags "$(k8s_ldflags "${work}")" -o "${out}/" "${K8S_COMMANDS[@]}"

  # --- etcd wrapper module -------------------------------------------------
  rm -rf "${etcd_work}"
  mkdir -p "${etcd_work}"
  cd "${etcd_work}"
  {
    log "step A6: etcd ${ETCD_VERSION} wrapper module"
    run_logged gocmd mod init pullkeeper.invalid/etcd-build
    run_logged gocmd mod edit "-require=go.etcd.io/etcd/server/v3@${ETCD_VERSION}"
    cat >tools.go <<'EOF'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
EOF
    run_logged gocmd mod tidy
    log "step A7: go build etcd"
    run_logged gocmd build -trimpath -ldflags "-s -w" -o "${out}/etcd" go.etcd.io/etcd/server/v3
  }

  log "step A8: checking the binaries"
  local v
  v="$("${out}/kube-apiserver" --version 2>&1)" || { log "kube-apiserver --version failed: ${v}"; return 1; }
  [[ "${v}" == "Kubernetes ${K8S_VERSION}" ]] || { log "unexpected kube-apiserver version: '${v}'"; return 1; }
  "${out}/kube-controller-manager" --version >>"${BUILD_LOG}" 2>&1 || { log "kube-controller-manager --version failed"; return 1; }
  "${out}/etcd" --version >>"${BUILD_LOG}" 2>&1 || { log "etcd --version failed"; return 1; }
  v="$("${out}/kubelet" --version 2>&1)" || { log "kubelet --version failed: ${v}"; return 1; }
  [[ "${v}" == "Kubernetes ${K8S_VERSION}" ]] || { log "unexpected kubelet version: '${v}'"; return 1; }
  "${out}/kubectl" version --client >>"${BUILD_LOG}" 2>&1 || { log "kubectl version --client failed"; return 1; }
  printf '%s\n' "${K8S_VERSION}" >"${out}/../VERSION"
}

# ---------------------------------------------------------------------------
# install: route B (Debian source package of Kubernetes 1.20.2, Debian's etcd)

build_debian() {
  local out="$1"
  local work="${CACHE_ROOT}/build/debian-kubernetes"
  [[ "$(id -u)" == 0 ]] || { log "route B needs root (apt-get)"; return 1; }
  need apt-get dpkg-query

  log "step B1: apt-get install etcd-server golang-1.19-go rsync golang-github-modern-go-reflect2-dev dpkg-dev"
  if [[ "${PULLKEEPER_APT_UPDATED:-}" != 1 ]]; then run_logged apt-get update; fi
  run_logged env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    etcd-server golang-1.19-go rsync make dpkg-dev golang-github-modern-go-reflect2-dev
  local reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [[ -d "${reflect2}" ]] || { log "${reflect2} missing after install"; return 1; }

  log "step B2: deb-src entry and apt-get source kubernetes"
  local src_list=/etc/apt/sources.list.d/pullkeeper-deb-src.sources
  if ! apt-get source --print-uris kubernetes >/dev/null 2>&1; then
    local base=/etc/apt/sources.list.d/debian.sources
    if [[ -f "${base}" ]]; then
      sed 's/^Types:.*/Types: deb-src/' "${base}" >"${src_list}"
    elif [[ -f /etc/apt/sources.list ]]; then
      sed -n 's/^deb[[:space:]]/deb-src /p' /etc/apt/sources.list >/etc/apt/sources.list.d/pullkeeper-deb-src.list
    else
      log "no apt source list found to derive a deb-src entry from"; return 1
    fi
    run_logged apt-get update
  fi
  rm -rf "${work}"
  mkdir -p "${work}/dl"
  cd "${work}/dl"
  run_logged apt-get source --download-only kubernetes
  local orig
  orig="$(find "${work}/dl" -maxdepth 1 -name 'kubernetes_*.orig.tar.*' | head -n1)"
  [[ -n "${orig}" ]] || { log "no kubernetes .orig tarball downloaded"; return 1; }
  local upstream ver
  upstream="$(basename "${orig}")"
  upstream="${upstream#kubernetes_}"
  upstream="${upstream%.orig.tar.*}"
  ver="v${upstream##*really}"
  mkdir -p "${work}/src"
  run_logged tar -xf "${orig}" -C "${work}/src" --strip-components=1

  log "step B3: replacing vendored reflect2 with Debian's fixed version"
  rm -rf "${work}/src/vendor/github.com/modern-go/reflect2"
  cp -r "${reflect2}" "${work}/src/vendor/github.com/modern-go/reflect2"
  rm -f "${work}/src/vendor/github.com/modern-go/reflect2/go.mod"

  log "step B4: make kube-apiserver kube-controller-manager (${ver}, Go 1.19, GOPATH mode)"
  mkdir -p "${work}/src/.go/src/k8s.io" "${work}/home"
  ln -sfn ../../.. "${work}/src/.go/src/k8s.io/kubernetes"
  local minor="${ver#v1.}"
  minor="${minor%%.*}"
  cd "${work}/src/.go/src/k8s.io/kubernetes"
  {
    run_logged env PATH="/usr/lib/go-1.19/bin:${PATH}" GOPATH="${work}/src/.go" GO111MODULE=off \
      GOFLAGS= GOTOOLCHAIN=local CGO_ENABLED=0 HOME="${work}/home" GOCACHE="${CACHE_ROOT}/go/build-1.19" \
      KUBE_GIT_VERSION="${ver}" KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR="${minor}" KUBE_GIT_TREE_STATE=clean \
      make WHAT="cmd/kube-apiserver cmd/kube-controller-manager"
  }
  cd /
  cp "${work}/src/_output/bin/kube-apiserver" "${work}/src/_output/bin/kube-controller-manager" "${out}/"
  cp "$(command -v etcd || echo /usr/bin/etcd)" "${out}/etcd"
  "${out}/kube-apiserver" --version >>"${BUILD_LOG}" 2>&1 || { log "kube-apiserver --version failed"; return 1; }
  printf '%s\n' "${ver}" >"${out}/../VERSION"
  rm -rf "${work}/src"   # 1+ GB of sources and objects; the binaries are cached
}

# Build with FUNC (in a child process, so that `set -e` applies inside it) into
# CACHE_ROOT/k8s-VERSION/bin, atomically. Sets BIN_DIR on success.
build_cached() {
  local func="$1" version="$2"
  local final="${CACHE_ROOT}/k8s-${version}"
  if has_binaries "${final}/bin"; then
    BIN_DIR="${final}/bin"
    return 0
  fi
  local tmp
  tmp="$(mktemp -d "${CACHE_ROOT}/.k8s-${version}.tmp.XXXXXX")"
  chmod 755 "${tmp}"
  mkdir -p "${tmp}/bin" "${CACHE_ROOT}/logs"
  BUILD_LOG="${CACHE_ROOT}/logs/build-${version}-$(date +%Y%m%d-%H%M%S).log"
  : >"${BUILD_LOG}"
  local t0=${SECONDS}
  log "building Kubernetes ${version} into ${final} (log: ${BUILD_LOG})"
  if PULLKEEPER_BUILD_LOG="${BUILD_LOG}" bash "${SELF}" __build "${func}" "${tmp}/bin" </dev/null >&2 &&
    has_binaries "${tmp}/bin"; then
    rm -rf "${final}"
    mv -T "${tmp}" "${final}"
    log "built Kubernetes ${version} in $((SECONDS - t0))s: ${final}/bin"
    BIN_DIR="${final}/bin"
    return 0
  fi
  rm -rf "${tmp}"
  log "building Kubernetes ${version} failed after $((SECONDS - t0))s (log: ${BUILD_LOG})"
  return 1
}

ensure_binaries() {
  if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    if has_binaries "${KUBEBUILDER_ASSETS}"; then
      BIN_DIR="$(cd "${KUBEBUILDER_ASSETS}" && pwd -P)"
      return 0
    fi
    log "KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS} lacks kube-apiserver, kube-controller-manager or etcd; ignoring it"
  fi
  local primary="${CACHE_ROOT}/k8s-${K8S_VERSION}/bin"
  local fallback="${CACHE_ROOT}/k8s-${FALLBACK_K8S_VERSION}/bin"
  local failed_marker="${CACHE_ROOT}/k8s-${K8S_VERSION}.build-failed"
  case "${ROUTE}" in
    auto|gomod|debian) ;;
    *) die "PULLKEEPER_CP_ROUTE must be auto, gomod or debian (got '${ROUTE}')" ;;
  esac
  # Fast paths without the lock.
  if [[ "${ROUTE}" != debian ]] && has_binaries "${primary}"; then
    BIN_DIR="${primary}"; return 0
  fi
  if [[ "${ROUTE}" == debian || ( "${ROUTE}" == auto && -f "${failed_marker}" ) ]] && has_binaries "${fallback}"; then
    [[ "${ROUTE}" == auto ]] &&
      log "FALLBACK: using Kubernetes ${FALLBACK_K8S_VERSION} (${fallback}); the ${K8S_VERSION} build failed before (delete ${failed_marker} to retry it)"
    BIN_DIR="${fallback}"; return 0
  fi

  mkdir -p "${CACHE_ROOT}"
  take_lock "${FD_INSTALL}" "${CACHE_ROOT}/install.lock" "install"
  # Remove leftovers of builds that were killed.
  find "${CACHE_ROOT}" -maxdepth 1 -name '.k8s-*.tmp.*' -exec rm -rf {} + 2>/dev/null || true
  if [[ "${ROUTE}" == gomod || ( "${ROUTE}" == auto && ! -f "${failed_marker}" ) ]]; then
    if build_cached build_gomod "${K8S_VERSION}"; then
      rm -f "${failed_marker}"
      release_lock "${FD_INSTALL}"; return 0
    fi
    [[ "${ROUTE}" == gomod ]] && die "building Kubernetes ${K8S_VERSION} from Go modules failed"
    printf '%s\n' "${BUILD_LOG}" >"${failed_marker}"
    log "FALLBACK: building ${K8S_VERSION} from Go modules failed; using Kubernetes ${FALLBACK_K8S_VERSION} from Debian's source package instead"
  fi
  build_cached build_debian "${FALLBACK_K8S_VERSION}" ||
    die "building Kubernetes ${FALLBACK_K8S_VERSION} from Debian's source package failed too"
  [[ "${ROUTE}" == auto ]] && log "FALLBACK: using Kubernetes ${FALLBACK_K8S_VERSION}, not ${K8S_VERSION}"
  release_lock "${FD_INSTALL}"
}

has_node_tools() {
  [[ -n "$1" && -x "$1/kubelet" && -x "$1/kubectl" ]]
}

# Make sure kubelet and kubectl exist next to the control plane's binaries (or, when
# those come from KUBEBUILDER_ASSETS without them, in the Go-module cache); sets NODE_BIN_DIR.
# A cache built before they were part of it gets just these two built, into the same bin
# directory, without touching the others.
NODE_BIN_DIR=""
ensure_node_tools() {
  ensure_binaries
  if has_node_tools "${BIN_DIR}"; then
    NODE_BIN_DIR="${BIN_DIR}"; return 0
  fi
  local final="${CACHE_ROOT}/k8s-${K8S_VERSION}"
  if [[ "${BIN_DIR}" == "${CACHE_ROOT}/k8s-${FALLBACK_K8S_VERSION}/bin" ]]; then
    die "kubelet and kubectl are only built for the Go-module route (Kubernetes ${K8S_VERSION}); this machine uses the ${FALLBACK_K8S_VERSION} fallback"
  fi
  if has_node_tools "${final}/bin"; then
    NODE_BIN_DIR="${final}/bin"; return 0
  fi
  take_lock "${FD_INSTALL}" "${CACHE_ROOT}/install.lock" "install"
  if ! has_node_tools "${final}/bin"; then
    local tmp t0=${SECONDS}
    mkdir -p "${CACHE_ROOT}/logs"
    tmp="$(mktemp -d "${CACHE_ROOT}/.k8s-${K8S_VERSION}.tmp.XXXXXX")"
    BUILD_LOG="${CACHE_ROOT}/logs/build-node-${K8S_VERSION}-$(date +%Y%m%d-%H%M%S).log"
    : >"${BUILD_LOG}"
    log "building kubelet and kubectl ${K8S_VERSION} into ${final}/bin (log: ${BUILD_LOG})"
    if ! PULLKEEPER_BUILD_LOG="${BUILD_LOG}" bash "${SELF}" __build build_node_tools "${tmp}" </dev/null >&2 ||
      ! has_node_tools "${tmp}"; then
      rm -rf "${tmp}"
      die "building kubelet and kubectl ${K8S_VERSION} failed after $((SECONDS - t0))s (log: ${BUILD_LOG})"
    fi
    mkdir -p "${final}/bin"
    # kubectl last: has_node_tools looks for both.
    mv -f "${tmp}/kubelet" "${final}/bin/kubelet"
    mv -f "${tmp}/kubectl" "${final}/bin/kubectl"
    rm -rf "${tmp}"
    log "built kubelet and kubectl ${K8S_VERSION} in $((SECONDS - t0))s: ${final}/bin"
  fi
  release_lock "${FD_INSTALL}"
  NODE_BIN_DIR="${final}/bin"
}

cmd_install() {
  ensure_tools flock:util-linux realpath:coreutils
  ensure_binaries
  # The Go-module route builds kubelet and kubectl with the others; a cache that predates
  # them gets them now. KUBEBUILDER_ASSETS and the fallback route are printed as they are.
  if [[ "${BIN_DIR}" == "${CACHE_ROOT}/k8s-${K8S_VERSION}/bin" ]]; then
    ensure_node_tools
  fi
  printf '%s\n' "${BIN_DIR}"
}

cmd_node_tool() {
  ensure_tools flock:util-linux realpath:coreutils
  ensure_node_tools
  printf '%s\n' "${NODE_BIN_DIR}/$1"
}

# ---------------------------------------------------------------------------
# start / stop

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

  ensure_binaries
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
    install) (($# == 0)) || usage; cmd_install ;;
    kubectl|kubelet) (($# == 0)) || usage; cmd_node_tool "${cmd}" ;;
    start) (($# == 1)) || usage; cmd_start "$1" ;;
    stop) (($# == 1)) || usage; cmd_stop "$1" ;;
    restart-apiserver) (($# == 1)) || usage; cmd_restart_apiserver "$1" ;;
    env) (($# == 1)) || usage; cmd_env "$1" ;;
    __build) # internal: __build FUNC OUTDIR, run by build_cached
      (($# == 2)) || usage
      BUILD_LOG="${PULLKEEPER_BUILD_LOG:?}"
      set -E
      trap 'log "build step failed (line ${LINENO}: ${BASH_COMMAND}); see ${BUILD_LOG}"' ERR
      case "$1" in build_gomod|build_debian|build_node_tools) "$1" "$2" ;; *) usage ;; esac ;;
    -h|--help|help) usage ;;
    *) usage ;;
  esac
}

# On one line, so that editing this file while it runs cannot change what runs.
main "$@"; exit
