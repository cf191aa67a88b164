# Helpers shared by the hack/ scripts that build and run the local control plane.
# Source it after setting PROG (the script's name, used in messages).
# shellcheck shell=bash

log() { printf '%s: %s\n' "${PROG}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${PROG}" "$*" >&2; exit 1; }

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
