#!/usr/bin/env bash
# Tests the Helm chart in charts/pullkeeper against a running control plane: lint and
# render it with the default values and every examples/*.yaml, check that its crds/ are
# the repository's generated CRDs, check the rendered objects with a server-side dry run,
# check that values.schema.json rejects bad values, then install it for real into a fresh
# namespace, check what it created (CRDs Established, Deployment, ServiceAccount, RBAC,
# Service) and what the ServiceAccount may do, upgrade it, and uninstall it.
#
#   hack/chart-test.sh KUBECONFIG
#
# KUBECONFIG is the kubeconfig of a cluster to test against; a scratch control plane
# (no nodes) is enough, since the operator's pods are never waited for:
#
#   kubeconfig=$(hack/control-plane.sh start /tmp/chart-cp | tail -1)
#   hack/chart-test.sh "$kubeconfig"
#   hack/control-plane.sh stop /tmp/chart-cp
#
# helm comes from hack/tools.sh, kubectl (the server's version) from
# `hack/control-plane.sh kubectl`. The last line of output is
# "N passed, M failed"; the exit status is non-zero if any check failed. The script removes
# what it installed, and the CRDs too if they were not there before it ran.
set -euo pipefail

if [[ $# -ne 1 || ! -r "$1" ]]; then
  echo "usage: $0 KUBECONFIG" >&2
  exit 2
fi
KUBECONFIG="$(realpath -- "$1")"
export KUBECONFIG
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tools="$(hack/tools.sh | tail -1)"
helm="$tools/helm"
kubectl="$(hack/control-plane.sh kubectl | tail -n1)"

readonly chart=charts/pullkeeper
readonly crds=(clusterregistrycredentials.pullkeeper.io registrycredentials.pullkeeper.io)
suffix="$(date +%s)-$RANDOM"
readonly ns="pullkeeper-chart-test-$suffix"
readonly release=pullkeeper
readonly fullname=pullkeeper   # the release name contains the chart name
work="$(mktemp -d)"
passed=0
failed=0
crds_preexisting=false
installed=false

# ---------------------------------------------------------------------------------------
# helpers

# check NAME COMMAND...: runs COMMAND, counts it, and shows its output only on failure.
check() {
  local name="$1"
  shift
  if "$@" >"$work/out" 2>&1; then
    passed=$((passed + 1))
    printf 'ok    %s\n' "$name"
  else
    failed=$((failed + 1))
    printf 'FAIL  %s\n' "$name"
    sed 's/^/      | /' "$work/out" | tail -n 40
  fi
}

# Helm logs an INFO line on stderr each time it follows the crds symlink; keep stderr for
# real errors only.
helm_q() { "$helm" "$@" 2> >(grep -v 'found symbolic link in path' >&2); }


cleanup() {
  local rc=$?
  if $installed; then
    "$helm" uninstall "$release" -n "$ns" --wait=false >/dev/null 2>&1 || true
  fi
  "$kubectl" delete namespace "$ns" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  if ! $crds_preexisting; then
    "$kubectl" delete crd "${crds[@]}" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

values_sets=(default)
for f in "$chart"/examples/*.yaml; do
  values_sets+=("$f")
done

# values_args SET: the helm arguments for one values set.
values_args() {
  if [[ "$1" == default ]]; then
    return 0
  fi
  printf '%s\n' -f "$1"
}

# ---------------------------------------------------------------------------------------
# checks that need no cluster state

crds_link_is_repo_crds() {
  [[ -L "$chart/crds" ]] || { echo "$chart/crds is not a symlink"; return 1; }
  [[ "$(realpath "$chart/crds")" == "$(realpath crds)" ]] || {
    echo "$chart/crds resolves to $(realpath "$chart/crds"), not $(realpath crds)"
    return 1
  }
}

# helm show crds prints exactly the repository's CRD files.
show_crds_match_repo() {
  helm_q show crds "$chart" >"$work/shown.yaml"
  cat crds/*.yaml >"$work/repo.yaml"
  # Helm separates the files with its own "---" and blank lines.
  diff <(grep -v -e '^---$' -e '^$' "$work/repo.yaml") <(grep -v -e '^---$' -e '^$' "$work/shown.yaml")
}

# The packaged chart holds real files with the same content (helm package follows links).
package_holds_crds() {
  mkdir -p "$work/pkg/x"
  helm_q package "$chart" -d "$work/pkg" >/dev/null
  tar -xzf "$work"/pkg/pullkeeper-*.tgz -C "$work/pkg/x"
  [[ ! -L "$work/pkg/x/pullkeeper/crds" ]] || { echo "the package holds a symlink"; return 1; }
  diff -r crds "$work/pkg/x/pullkeeper/crds"
}

lint() {
  local set="$1"
  local args
  mapfile -t args < <(values_args "$set")
  helm_q lint --strict "$chart" "${args[@]}"
}

# template SET OUT: renders with CRDs; both CRDs and every kind of object must be there.
template() {
  local set="$1" out="$2"
  local args
  mapfile -t args < <(values_args "$set")
  helm_q template "$release" "$chart" -n "$ns" --include-crds "${args[@]}" >"$out"
  local kind
  for kind in CustomResourceDefinition Deployment ServiceAccount ClusterRole \
    ClusterRoleBinding Role RoleBinding Service; do
    grep -q "^kind: $kind\$" "$out" || { echo "no $kind rendered"; return 1; }
  done
  local n
  n="$(grep -c '^kind: CustomResourceDefinition$' "$out")"
  [[ "$n" -eq 2 ]] || { echo "$n CRDs rendered, want 2"; return 1; }
}

# rendered FILE PATTERN: the rendered manifests contain a line matching PATTERN.
rendered() { grep -E -- "$2" "$1"; }
# not_rendered FILE PATTERN: they do not (grep's status 1; 2 is an error).
not_rendered() {
  local rc=0
  grep -E -- "$2" "$1" || rc=$?
  [[ "$rc" -eq 1 ]]
}

# schema_rejects KEY ARGS...: helm template with ARGS fails, naming KEY.
schema_rejects() {
  local key="$1"
  shift
  if helm_q template "$release" "$chart" "$@" >"$work/rejected" 2>&1; then
    echo "helm template accepted $*"
    return 1
  fi
  cat "$work/rejected"
  grep -q -- "$key" "$work/rejected"
}

template_with() { helm_q template "$release" "$chart" -n "$ns" "$@"; }

kube_version_refused() {
  ! template_with --kube-version "$1" >"$work/kube-version" 2>&1 || { echo "rendered for $1"; return 1; }
  cat "$work/kube-version"
  grep -q 'incompatible with Kubernetes' "$work/kube-version"
}

# ---------------------------------------------------------------------------------------
# checks against the cluster

# dry_run FILE: the apiserver accepts every object, and the pod raises no warning from the
# namespace's Pod Security "restricted" level.
dry_run() {
  "$kubectl" apply --dry-run=server -f "$1" >"$work/dry-run" 2>&1 || { cat "$work/dry-run"; return 1; }
  cat "$work/dry-run"
  ! grep -i 'violate PodSecurity' "$work/dry-run"
}

crd_established() {
  "$kubectl" wait --for=condition=Established --timeout=60s "crd/$1"
}

exists() { "$kubectl" get "$@" -o name; }
gone() {
  local out
  out="$("$kubectl" get "$@" --ignore-not-found -o name)"
  [[ -z "$out" ]] || { echo "still there: $out"; return 1; }
}

# can VERB RESOURCE [ARGS...]: the operator's ServiceAccount may VERB RESOURCE (ARGS: -n NS,
# -A for every namespace).
can() { "$kubectl" auth can-i "$@" --as "system:serviceaccount:$ns:$fullname"; }
# cannot VERB RESOURCE [ARGS...]: a clear "no", not an error.
cannot() {
  local answer
  answer="$(can "$@" 2>"$work/can-err")" && { echo "$answer"; return 1; }
  echo "$answer"
  cat "$work/can-err"
  [[ "$answer" == no ]]
}

# The ClusterRegistryCredential the install notes suggest is valid.
notes_example_valid() {
  "$helm" get notes "$release" -n "$ns" | sed -n "/<<'YAML'/,/^YAML\$/p" | sed '1d;$d' >"$work/notes.yaml"
  grep -q '^kind: ClusterRegistryCredential$' "$work/notes.yaml" || { echo "no example in the notes"; return 1; }
  "$kubectl" apply --dry-run=server -f "$work/notes.yaml"
}

# The CRD upgrade command the notes and README give is accepted over Helm's CRDs.
crd_upgrade_command() {
  helm_q show crds "$chart" | "$kubectl" apply --server-side --force-conflicts --dry-run=server -f -
}

release_deployed() {
  "$helm" status "$release" -n "$ns" | grep "^STATUS: deployed"
}

deployment_env() {
  "$kubectl" -n "$ns" get deployment "$fullname" \
    -o jsonpath='{range .spec.template.spec.containers[0].env[*]}{.name}={.value}{"\n"}{end}' |
    grep -Fx "$1"
}

# ---------------------------------------------------------------------------------------

echo "chart: $chart   cluster: $("$kubectl" config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
"$kubectl" version >/dev/null 2>&1 || { echo "cannot reach the cluster with $KUBECONFIG" >&2; exit 1; }
if "$kubectl" get crd "${crds[0]}" >/dev/null 2>&1; then
  crds_preexisting=true
  echo "note: the pullkeeper CRDs already exist; helm install will leave them as they are"
fi

echo "--- chart contents"
check "crds/ is a symlink to the repository's crds/" crds_link_is_repo_crds
check "helm show crds prints the repository's CRDs" show_crds_match_repo
check "helm package stores the CRD files" package_holds_crds

echo "--- lint and render"
for set in "${values_sets[@]}"; do
  name="${set##*/}"
  check "helm lint --strict ($name)" lint "$set"
  check "helm template renders CRDs and every object ($name)" template "$set" "$work/render-${name}"
done
check "AWS example annotates the ServiceAccount with the role" \
  rendered "$work/render-values-aws-irsa.yaml" '^    eks\.amazonaws\.com/role-arn: arn:aws:iam::'
check "GKE example annotates the ServiceAccount with the Google service account" \
  rendered "$work/render-values-gke-workload-identity.yaml" '^    iam\.gke\.io/gcp-service-account: '
check "AKS example annotates the ServiceAccount with the client id" \
  rendered "$work/render-values-aks-workload-identity.yaml" '^    azure\.workload\.identity/client-id: '
check "AKS example labels the pod for the workload identity webhook" \
  rendered "$work/render-values-aks-workload-identity.yaml" '^        azure\.workload\.identity/use: "true"$'
check "image defaults to ghcr.io/pullkeeper/pullkeeper:<appVersion>" \
  rendered "$work/render-default" '^          image: "ghcr\.io/pullkeeper/pullkeeper:0\.1\.0"$'
check "no ServiceMonitor or PodDisruptionBudget by default" \
  not_rendered "$work/render-default" '^kind: (ServiceMonitor|PodDisruptionBudget)$'
template_with --set metrics.serviceMonitor.enabled=true >"$work/render-sm" 2>&1 || true
check "metrics.serviceMonitor.enabled renders a ServiceMonitor" \
  rendered "$work/render-sm" '^kind: ServiceMonitor$'
template_with --set replicas=2 >"$work/render-2" 2>&1 || true
check "replicas=2 renders a PodDisruptionBudget" rendered "$work/render-2" '^kind: PodDisruptionBudget$'
template_with --set image.digest=sha256:"$(printf '%064d' 0)" >"$work/render-digest" 2>&1 || true
check "image.digest pulls by digest" \
  rendered "$work/render-digest" '^          image: "ghcr\.io/pullkeeper/pullkeeper@sha256:0{64}"$'
check "kubeVersion refuses Kubernetes 1.24" kube_version_refused 1.24.0

echo "--- values.schema.json"
check "schema rejects replicas=abc" schema_rejects replicas --set replicas=abc
check "schema rejects an unknown top-level key" schema_rejects replica --set replica=2
check "schema rejects logFormat=xml" schema_rejects logFormat --set logFormat=xml
check "schema rejects image.pullPolicy=Sometimes" schema_rejects pullPolicy --set image.pullPolicy=Sometimes
check "schema rejects an unknown image key" schema_rejects imag --set image.name=x
check "schema accepts a percentage for pdb.minAvailable" \
  template_with --set pdb.enabled=true --set pdb.minAvailable=50%

echo "--- server-side dry run"
for set in "${values_sets[@]}"; do
  name="${set##*/}"
  # The objects are namespaced into $ns, which must exist for the dry run.
  "$kubectl" create namespace "$ns" --dry-run=client -o yaml | "$kubectl" apply -f - >/dev/null
  "$kubectl" label --overwrite namespace "$ns" pod-security.kubernetes.io/warn=restricted >/dev/null
  check "kubectl apply --dry-run=server accepts the objects, pod is PSS-restricted ($name)" \
    dry_run "$work/render-${name}"
done
"$kubectl" delete namespace "$ns" --wait=true --timeout=60s >/dev/null

echo "--- install"
check "helm install into a fresh namespace" \
  helm_q install "$release" "$chart" -n "$ns" --create-namespace
installed=true
for crd in "${crds[@]}"; do
  check "CRD $crd is Established" crd_established "$crd"
done
check "Deployment exists" exists -n "$ns" deployment "$fullname"
check "ServiceAccount exists" exists -n "$ns" serviceaccount "$fullname"
check "ClusterRole and ClusterRoleBinding exist" exists clusterrole,clusterrolebinding "$fullname"
check "Role and RoleBinding exist" exists -n "$ns" role,rolebinding "$fullname-leader-election"
check "metrics Service exists" exists -n "$ns" service "$fullname-metrics"
check "helm lists the release as deployed" release_deployed
check "the install notes' example ClusterRegistryCredential is valid" notes_example_valid
check "the documented CRD upgrade command is accepted" crd_upgrade_command

echo "--- what the ServiceAccount may do"
check "SA may watch namespaces" can watch namespaces
check "SA may create secrets in every namespace" can create secrets -A
check "SA may delete secrets in every namespace" can delete secrets -A
check "SA may patch serviceaccounts in every namespace" can patch serviceaccounts -A
check "SA may create events.k8s.io events in every namespace" can create events.events.k8s.io -A
check "SA may patch clusterregistrycredentials" can patch clusterregistrycredentials.pullkeeper.io
check "SA may watch registrycredentials in every namespace" can watch registrycredentials.pullkeeper.io -A
check "SA may patch registrycredentials/status" \
  can patch registrycredentials.pullkeeper.io --subresource status -A
check "SA may update clusterregistrycredentials/finalizers" \
  can update clusterregistrycredentials.pullkeeper.io --subresource finalizers
check "SA may update leases in the release namespace" can update leases.coordination.k8s.io -n "$ns"
check "SA may not create leases in other namespaces" cannot create leases.coordination.k8s.io -n default
check "SA may not update secrets (it patches them)" cannot update secrets -n default
check "SA may not read pods" cannot get pods -n default
check "SA may not delete namespaces" cannot delete namespaces
check "SA may not delete serviceaccounts" cannot delete serviceaccounts -n default
check "SA may not delete clusterregistrycredentials" cannot delete clusterregistrycredentials.pullkeeper.io

echo "--- upgrade"
check "helm upgrade --set logLevel=debug" \
  helm_q upgrade "$release" "$chart" -n "$ns" --reuse-values --set logLevel=debug
check "the Deployment has the new PULLKEEPER_LOG" deployment_env "PULLKEEPER_LOG=debug"
check "the Deployment keeps PULLKEEPER_LOG_FORMAT=json" deployment_env "PULLKEEPER_LOG_FORMAT=json"

echo "--- uninstall"
check "helm uninstall" helm_q uninstall "$release" -n "$ns" --wait
installed=false
check "Deployment, ServiceAccount, Service, Role, RoleBinding are gone" \
  gone -n "$ns" deployment/"$fullname" serviceaccount/"$fullname" service/"$fullname-metrics" \
  role/"$fullname-leader-election" rolebinding/"$fullname-leader-election"
check "ClusterRole and ClusterRoleBinding are gone" \
  gone clusterrole/"$fullname" clusterrolebinding/"$fullname"
check "CRDs are kept (Helm never deletes CRDs)" exists crd "${crds[@]}"

echo "$passed passed, $failed failed"
[[ "$failed" -eq 0 ]]
