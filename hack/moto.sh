#!/usr/bin/env bash
# Starts moto's AWS API server (for ECR and STS) on loopback, installing it into a venv
# under the cache on first use.
#
#   hack/moto.sh start DIR [ENV=VALUE ...]   start (or reuse); last line: http://127.0.0.1:PORT
#   hack/moto.sh stop DIR                    stop it
#   hack/moto.sh install                     only install moto
set -euo pipefail

cache="${PULLKEEPER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pullkeeper}"
venv="$cache/venv"
moto_version="5.2.*"

ensure_moto() {
  if [[ -x "$venv/bin/moto_server" ]]; then
    return
  fi
  echo "installing moto[server] $moto_version into $venv" >&2
  python3 -m venv "$venv" >&2 || {
    [[ $(id -u) -eq 0 ]] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv" >&2
  }
  "$venv/bin/pip" install --quiet "moto[server]==$moto_version" >&2
}

cmd="${1:-}"
dir="${2:-}"
if [[ "$cmd" == install ]]; then
  ensure_moto
  exit 0
fi
[[ -n "$cmd" && -n "$dir" ]] || { echo "usage: $0 start DIR [ENV=VALUE ...] | stop DIR" >&2; exit 2; }

case "$cmd" in
  start)
    shift 2
    ensure_moto
    mkdir -p "$dir"
    exec 9>"$dir/.lock"
    flock 9
    if [[ -f "$dir/pid" && -f "$dir/url" ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      cat "$dir/url"
      exit 0
    fi
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
    env "$@" setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$dir/moto.log" 2>&1 </dev/null 9>&- &
    echo $! >"$dir/pid"
    for _ in $(seq 1 150); do
      if curl -s -o /dev/null "http://127.0.0.1:$port/moto-api/"; then
        echo "http://127.0.0.1:$port" | tee "$dir/url"
        exit 0
      fi
      sleep 0.1
    done
    echo "moto did not start; log:" >&2
    cat "$dir/moto.log" >&2
    exit 1
    ;;
  stop)
    if [[ -f "$dir/pid" ]]; then
      kill "$(cat "$dir/pid")" 2>/dev/null || true
      rm -f "$dir/pid" "$dir/url"
    fi
    ;;
  *)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
