#!/usr/bin/env bash
# Starts a real OCI registry (CNCF distribution, Debian's docker-registry) on loopback with
# htpasswd authentication, for tests that pull with the Secrets pullkeeper writes.
#
#   hack/registry.sh start DIR USER PASSWORD [tls]
#                                              start (or reuse); last line: host:port;
#                                              with "tls", HTTPS with a self-signed CA
#                                              written to DIR/ca.crt
#   hack/registry.sh start DIR - - token REALM CERT
#                                              Bearer-token auth: tokens from REALM,
#                                              signed by the key of CERT (issuer
#                                              "pullkeeper-test-issuer", service
#                                              "pullkeeper-test-registry")
#   hack/registry.sh stop DIR                  stop it
set -euo pipefail

ensure_packages() {
  local need=()
  command -v docker-registry >/dev/null || need+=(docker-registry)
  command -v skopeo >/dev/null || need+=(skopeo)
  command -v htpasswd >/dev/null || need+=(apache2-utils)
  if ((${#need[@]})); then
    [[ $(id -u) -eq 0 ]] || { echo "missing packages: ${need[*]}" >&2; exit 1; }
    echo "installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

cmd="${1:-}"
dir="${2:-}"
[[ -n "$cmd" && -n "$dir" ]] || { echo "usage: $0 start DIR USER PASSWORD | stop DIR" >&2; exit 2; }

case "$cmd" in
  start)
    user="${3:?user}"; password="${4:?password}"; tls="${5:-}"
    ensure_packages
    mkdir -p "$dir"
    exec 9>"$dir/.lock"
    flock 9
    if [[ -f "$dir/pid" && -f "$dir/addr" ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null \
      && curl -sk -o /dev/null "http://$(cat "$dir/addr")/v2/"; then
      cat "$dir/addr"
      exit 0
    fi
    port="$(free_port)"
    mkdir -p "$dir/data"
    tls_config=""
    scheme=http
    if [[ "$tls" == tls ]]; then
      scheme=https
      openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=pullkeeper test CA" \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" >/dev/null 2>&1
      openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
        -keyout "$dir/tls.key" -out "$dir/tls.csr" >/dev/null 2>&1
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$dir/san.ext"
      openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
        -days 30 -extfile "$dir/san.ext" -out "$dir/tls.crt" >/dev/null 2>&1
      tls_config="  tls:
    certificate: $dir/tls.crt
    key: $dir/tls.key"
    fi
    if [[ "$tls" == token ]]; then
      realm="${6:?realm}"; cert="${7:?issuer certificate}"
      auth_config="auth:
  token:
    realm: $realm
    service: pullkeeper-test-registry
    issuer: pullkeeper-test-issuer
    rootcertbundle: $cert"
    else
      htpasswd -Bbn "$user" "$password" >"$dir/htpasswd"
      auth_config="auth:
  htpasswd:
    realm: pullkeeper-test
    path: $dir/htpasswd"
    fi
    cat >"$dir/config.yml" <<EOT
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
$tls_config
$auth_config
EOT
    setsid docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 < /dev/null 9>&- &
    echo $! >"$dir/pid"
    for _ in $(seq 1 100); do
      code="$(curl -sk -o /dev/null -w '%{http_code}' "$scheme://127.0.0.1:$port/v2/" || true)"
      if [[ "$code" == 401 ]]; then
        echo "127.0.0.1:$port" >"$dir/addr"
        echo "127.0.0.1:$port"
        exit 0
      fi
      sleep 0.1
    done
    echo "registry did not start; log:" >&2
    cat "$dir/registry.log" >&2
    exit 1
    ;;
  stop)
    if [[ -f "$dir/pid" ]]; then
      kill "$(cat "$dir/pid")" 2>/dev/null || true
      rm -f "$dir/pid" "$dir/addr"
    fi
    ;;
  *)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
