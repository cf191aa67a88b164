#!/usr/bin/env bash
# Tests the Helm chart in charts/pullkeeper against a running control plane: lint and
# render it with the default values and every examples/*.yaml, check that its crds/ are
# the repository's generated CRDs, check the rendered objects with a server-side dry run,
# check that values.schema.json rejects bad values, then install it for real into a fresh
# namespace, check what it created (CRDs Established, Deployment, ServiceAccount, RBAC,
# admission policies, Service) and what the ServiceAccount may do (RBAC with
# `kubectl auth can-i`, the admission policies with requests made as that ServiceAccount),
# upgrade it, and uninstall it.
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
  "$kubectl" delete namespace "$ns" "$ns-victim" --ignore-not-found --wait=false >/dev/null 2>&1 || true
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

# env_value FILE NAME VALUE: the rendered container sets environment variable NAME to VALUE.
env_value() { grep -A1 "name: $2\$" "$1" | grep -qxF "              value: \"$3\""; }

kube_version_refused() {
  ! template_with --kube-version "$1" >"$work/kube-version" 2>&1 || { echo "rendered for $1"; return 1; }
  cat "$work/kube-version"
  grep -q 'incompatible with Kubernetes' "$work/kube-version"
}

# count_kind FILE KIND N: exactly N objects of KIND are rendered.
count_kind() {
  local n
  n="$(grep -c "^kind: $2\$" "$1" || true)"
  [[ "$n" -eq "$3" ]] || { echo "$n $2 rendered, want $3"; return 1; }
}

# The admission policy API, as `helm template` does not ask a cluster for it.
readonly vap_api=admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy

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

# The apiserver found no type errors in the policies' CEL.
policies_type_check() {
  local p out
  for p in secrets serviceaccounts token-requests; do
    out="$("$kubectl" get validatingadmissionpolicy "$fullname-$p" -o jsonpath='{.status.typeChecking}')"
    echo "$p: $out"
    [[ "$out" != *expressionWarnings* ]] || return 1
  done
}

# retrying COMMAND...: COMMAND succeeds within 15 s. The apiserver's RBAC authorizer
# learns of changed roles from a watch, so a check right after an upgrade may see the old
# rules for a moment.
retrying() {
  local i
  for i in $(seq 1 30); do
    if "$@"; then
      return 0
    fi
    sleep 0.5
  done
  return 1
}

release_deployed() {
  "$helm" status "$release" -n "$ns" | grep "^STATUS: deployed"
}

deployment_env() {
  "$kubectl" -n "$ns" get deployment "$fullname" \
    -o jsonpath='{range .spec.template.spec.containers[0].env[*]}{.name}={.value}{"\n"}{end}' |
    grep -Fx "$1"
}

# denied_as_operator WHAT ARGS...: kubectl ARGS (pass --dry-run=server where kubectl
# has it) as the operator's ServiceAccount is refused by the chart's admission policy WHAT. New policies take a
# moment to be enforced, so this retries for up to 30 s while the request is allowed.
denied_as_operator() {
  local what="$1"
  shift
  local i
  for i in $(seq 1 30); do
    if "$kubectl" "$@" --as "system:serviceaccount:$ns:$fullname" >"$work/denied" 2>&1; then
      sleep 1
      continue
    fi
    cat "$work/denied"
    grep -q "ValidatingAdmissionPolicy '$fullname-$what'" "$work/denied"
    return
  done
  echo "still allowed after 30 s:"
  cat "$work/denied"
  return 1
}

# allowed_as_operator ARGS...: kubectl ARGS as the operator's ServiceAccount succeeds.
allowed_as_operator() {
  "$kubectl" "$@" --as "system:serviceaccount:$ns:$fullname" >/dev/null
}

# A pull secret as the operator writes it, and a Secret it must not write.
pull_secret_manifest() {
  cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: pullkeeper-chart-test
  namespace: $1
  labels: {app.kubernetes.io/managed-by: pullkeeper}
type: kubernetes.io/dockerconfigjson
stringData: {.dockerconfigjson: '{"auths":{}}'}
YAML
}
# A kubernetes.io/tls Secret NAME in namespace NS (the webhook's certificate, or not).
tls_secret_manifest() {
  cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: $2
  namespace: $1
type: kubernetes.io/tls
stringData: {tls.crt: "x", tls.key: "k"}
YAML
}
sa_token_secret_manifest() {
  cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: pullkeeper-chart-test-token
  namespace: $1
  labels: {app.kubernetes.io/managed-by: pullkeeper}
  annotations: {kubernetes.io/service-account.name: default}
type: kubernetes.io/service-account-token
YAML
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

echo "--- admission policies, source namespace, metrics, aggregated roles"
template_with --api-versions "$vap_api" >"$work/render-vap" 2>&1 || true
check "with the v1 API served, three ValidatingAdmissionPolicies are rendered" \
  count_kind "$work/render-vap" ValidatingAdmissionPolicy 3
check "... and three bindings" count_kind "$work/render-vap" ValidatingAdmissionPolicyBinding 3
check "the policies match the operator's ServiceAccount only" \
  rendered "$work/render-vap" "expression: request.userInfo.username == \"system:serviceaccount:$ns:$fullname\"\$"
check "without the v1 API, no policy is rendered" \
  count_kind "$work/render-default" ValidatingAdmissionPolicy 0
template_with --api-versions "$vap_api" --set admissionPolicy.enabled=false >"$work/render-novap" 2>&1 || true
check "admissionPolicy.enabled=false renders no policy" \
  count_kind "$work/render-novap" ValidatingAdmissionPolicy 0
template_with --api-versions "$vap_api" --set 'admissionPolicy.extraTokenAudiences={vault,https://sts.example.com}' \
  >"$work/render-aud" 2>&1 || true
check "admissionPolicy.extraTokenAudiences extends the allowed audiences" \
  grep -F -- '[\"sts.amazonaws.com\",\"api://AzureADTokenExchange\",\"vault\",\"https://sts.example.com\"]' "$work/render-aud"
check "the ClusterRole grants create on serviceaccounts/token" \
  rendered "$work/render-default" 'resources: \["serviceaccounts/token"\]'
check "by default the ClusterRole may get Secrets everywhere" \
  rendered "$work/render-default" 'verbs: \["get", "list", "watch", "create", "patch", "delete"\]'
template_with --set sourceSecrets.namespace=creds >"$work/render-src" 2>&1 || true
check "sourceSecrets.namespace drops get on Secrets from the ClusterRole" \
  not_rendered "$work/render-src" 'verbs: \["get", "list", "watch", "create", "patch", "delete"\]'
check "sourceSecrets.namespace grants get on Secrets in that namespace" \
  rendered "$work/render-src" '^  name: pullkeeper-source-secrets$'
check "sourceSecrets.namespace sets PULLKEEPER_SOURCE_SECRET_NAMESPACE" \
  grep -A1 'name: PULLKEEPER_SOURCE_SECRET_NAMESPACE$' "$work/render-src"
helm_q install --dry-run=client "$release" "$chart" -n "$ns" --set sourceSecrets.namespace=creds \
  >"$work/notes-src" 2>&1 || true
check "sourceSecrets.namespace: the notes' example reads from that namespace" \
  rendered "$work/notes-src" 'secretRef: \{name: ghcr-login, namespace: creds\}'
helm_q install --dry-run=client "$release" "$chart" -n "$ns" --set workloadChecks.enabled=true \
  --set sourceSecrets.namespace=creds >"$work/notes-wlc" 2>&1 || true
check "workloadChecks.enabled: the notes show where the findings go" \
  rendered "$work/notes-wlc" "jsonpath='\{.status.workloads\}'"
check "... and, with sourceSecrets.namespace and no pullSecretNamespaces, what will be SecretForbidden" \
  rendered "$work/notes-wlc" 'reported as SecretForbidden'
check "by default the notes say nothing of workload checks" not_rendered "$work/notes-src" 'status.workloads'
check "by default no source-secrets Role and no PULLKEEPER_SOURCE_SECRET_NAMESPACE" \
  not_rendered "$work/render-default" 'pullkeeper-source-secrets|PULLKEEPER_SOURCE_SECRET_NAMESPACE'
template_with --set workloadChecks.enabled=true --set workloadChecks.interval=5m >"$work/render-wlc" 2>&1 || true
check "workloadChecks.enabled grants list and watch on Deployments, StatefulSets, DaemonSets, ReplicaSets" \
  rendered "$work/render-wlc" 'resources: \["deployments", "statefulsets", "daemonsets", "replicasets"\]'
check "... on Jobs and CronJobs" rendered "$work/render-wlc" 'resources: \["jobs", "cronjobs"\]'
check "... on Pods and Nodes" rendered "$work/render-wlc" 'resources: \["pods", "nodes"\]'
check "workloadChecks.enabled sets PULLKEEPER_WORKLOAD_CHECKS=true" \
  env_value "$work/render-wlc" PULLKEEPER_WORKLOAD_CHECKS true
check "workloadChecks.interval sets PULLKEEPER_WORKLOAD_CHECK_INTERVAL" \
  env_value "$work/render-wlc" PULLKEEPER_WORKLOAD_CHECK_INTERVAL 5m
check "by default no workload checks, and no access to workloads, Pods or Nodes" \
  not_rendered "$work/render-default" 'PULLKEEPER_WORKLOAD_CHECK|"cronjobs"|"nodes"|pull-secrets'
template_with --set workloadChecks.enabled=true --set sourceSecrets.namespace=creds \
  --set 'workloadChecks.pullSecretNamespaces={team-a,team-b}' >"$work/render-wlc-src" 2>&1 || true
check "workloadChecks.pullSecretNamespaces with sourceSecrets.namespace: get on Secrets there" \
  grep -Pzo 'kind: Role\nmetadata:\n  name: pullkeeper-pull-secrets\n  namespace: team-b\n' "$work/render-wlc-src"
check "... and still no get on Secrets in the ClusterRole" \
  not_rendered "$work/render-wlc-src" 'verbs: \["get", "list", "watch", "create", "patch", "delete"\]'
template_with --set workloadChecks.enabled=true --set 'workloadChecks.pullSecretNamespaces={team-a}' \
  >"$work/render-wlc-all" 2>&1 || true
check "workloadChecks.pullSecretNamespaces without sourceSecrets.namespace renders no Role (get is cluster-wide)" \
  not_rendered "$work/render-wlc-all" 'pull-secrets'
check "probes use the health port" rendered "$work/render-default" '^              port: http-health$'
check "the health port is 8081 on all addresses" \
  grep -A1 'name: PULLKEEPER_HEALTH_ADDR$' "$work/render-default"
check "by default no review permissions and no metrics-reader" \
  not_rendered "$work/render-default" 'tokenreviews|subjectaccessreviews|metrics-reader'
check "by default PULLKEEPER_METRICS_AUTH is false" \
  grep -A1 -x ' *- name: PULLKEEPER_METRICS_AUTH' "$work/render-default"
template_with --set metrics.auth.enabled=true --set metrics.serviceMonitor.enabled=true >"$work/render-auth" 2>&1 || true
check "metrics.auth.enabled grants create on tokenreviews" rendered "$work/render-auth" 'resources: \["tokenreviews"\]'
check "metrics.auth.enabled grants create on subjectaccessreviews" \
  rendered "$work/render-auth" 'resources: \["subjectaccessreviews"\]'
check "metrics.auth.enabled ships the metrics-reader ClusterRole" \
  rendered "$work/render-auth" '^  name: pullkeeper-metrics-reader$'
check "metrics.auth.enabled sets PULLKEEPER_METRICS_AUTH=true" \
  grep -A1 'name: PULLKEEPER_METRICS_AUTH$' "$work/render-auth"
check "metrics.auth.enabled: the ServiceMonitor sends a bearer token" \
  rendered "$work/render-auth" 'bearerTokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token'
template_with --set metrics.bindAddress=127.0.0.1 >"$work/render-lo" 2>&1 || true
check "metrics.bindAddress=127.0.0.1 listens on loopback" \
  rendered "$work/render-lo" '^              value: "127\.0\.0\.1:8080"$'
check "metrics.bindAddress=127.0.0.1 renders no metrics Service" count_kind "$work/render-lo" Service 0
template_with --set metrics.bindAddress=::1 >"$work/render-lo6" 2>&1 || true
check "metrics.bindAddress=::1 is bracketed" rendered "$work/render-lo6" '^              value: "\[::1\]:8080"$'
check "a ServiceMonitor with loopback metrics is refused" \
  schema_rejects metrics.bindAddress --set metrics.bindAddress=127.0.0.1 --set metrics.serviceMonitor.enabled=true
check "aggregated roles reach view, edit and admin by default" \
  rendered "$work/render-default" 'rbac\.authorization\.k8s\.io/aggregate-to-view: "true"'
check "the edit role writes registrycredentials only" \
  grep -A3 'resources: \["registrycredentials"\]$' "$work/render-default"
template_with --set aggregateRoles.enabled=false >"$work/render-noagg" 2>&1 || true
check "aggregateRoles.enabled=false renders no aggregated role" \
  not_rendered "$work/render-noagg" 'aggregate-to-'
echo "--- pod admission webhook"
readonly map_api=admissionregistration.k8s.io/v1/MutatingAdmissionPolicy
check "by default no webhook, no webhook Service and no webhook permissions" \
  not_rendered "$work/render-default" 'MutatingWebhookConfiguration|pullkeeper-webhook|mutatingwebhookconfigurations|PULLKEEPER_POD_ADMISSION_WEBHOOK'
template_with --api-versions "$vap_api" --set podAdmission.webhook.enabled=true >"$work/render-wh" 2>&1 || true
check "webhook.enabled (no MutatingAdmissionPolicy v1): one MutatingWebhookConfiguration" \
  count_kind "$work/render-wh" MutatingWebhookConfiguration 1
check "... failing open, without side effects, on Pod CREATE only" \
  grep -Pzo 'failurePolicy: Ignore\n\s+matchPolicy: Equivalent\n\s+reinvocationPolicy: IfNeeded\n\s+timeoutSeconds: 5\n' "$work/render-wh"
check "... sideEffects None" rendered "$work/render-wh" '^    sideEffects: None$'
check "... operations CREATE on pods" \
  grep -Pzo 'operations: \["CREATE"\]\n\s+resources: \["pods"\]' "$work/render-wh"
check "... skipping kube-system and the release namespace" \
  rendered "$work/render-wh" "values: \[\"kube-system\",\"$ns\"\]\$"
check "... through the webhook Service" rendered "$work/render-wh" "^        name: pullkeeper-webhook\$"
check "... which targets the https-webhook port" rendered "$work/render-wh" '^      targetPort: https-webhook$'
check "webhook.enabled sets PULLKEEPER_POD_ADMISSION_WEBHOOK" \
  grep -A1 'name: PULLKEEPER_POD_ADMISSION_WEBHOOK$' "$work/render-wh"
check "webhook.enabled: the operator manages its certificate in a Secret" \
  grep -A1 'name: PULLKEEPER_WEBHOOK_CERT_SECRET$' "$work/render-wh"
check "webhook.enabled grants get and patch on its own MutatingWebhookConfiguration only" \
  grep -Pzo 'resources: \["mutatingwebhookconfigurations"\]\n\s+resourceNames: \["pullkeeper"\]\n\s+verbs: \["get", "patch"\]' "$work/render-wh"
check "webhook.enabled grants get on its certificate Secret by name" \
  rendered "$work/render-wh" '^    resourceNames: \["pullkeeper-webhook-cert"\]$'
check "webhook.enabled lets the admission policy allow the certificate Secret" \
  rendered "$work/render-wh" 'object.metadata.name == "pullkeeper-webhook-cert" &&$'
check "without the webhook the admission policy allows no certificate Secret" \
  grep -A1 'name: isWebhookCert$' "$work/render-vap"
check "... (its expression is false)" rendered "$work/render-vap" '^      expression: "false"$'
template_with --api-versions "$map_api" --set podAdmission.webhook.enabled=true >"$work/render-wh-map" 2>&1 || true
check "where MutatingAdmissionPolicy v1 is served, the policy wins: no webhook" \
  count_kind "$work/render-wh-map" MutatingWebhookConfiguration 0
check "... and no webhook permissions" not_rendered "$work/render-wh-map" 'mutatingwebhookconfigurations'
template_with --api-versions "$map_api" --set podAdmission.enabled=false --set podAdmission.webhook.enabled=true \
  >"$work/render-wh-nomap" 2>&1 || true
check "with podAdmission.enabled=false the webhook is used where the policy is served too" \
  count_kind "$work/render-wh-nomap" MutatingWebhookConfiguration 1
template_with --set podAdmission.webhook.enabled=true --set podAdmission.webhook.certManager.enabled=true \
  >"$work/render-cm" 2>&1 || true
check "certManager.enabled renders a Certificate" count_kind "$work/render-cm" Certificate 1
check "... and a self-signed Issuer" rendered "$work/render-cm" '^  selfSigned: \{\}$'
check "... for the webhook Service's DNS names" \
  rendered "$work/render-cm" "^    - pullkeeper-webhook\.$ns\.svc\$"
check "... whose CA cert-manager injects" \
  rendered "$work/render-cm" "^    cert-manager\.io/inject-ca-from: $ns/pullkeeper-webhook\$"
check "... mounted into the operator" grep -A1 'name: PULLKEEPER_WEBHOOK_CERT_DIR$' "$work/render-cm"
check "... from the Certificate's Secret" rendered "$work/render-cm" '^            secretName: pullkeeper-webhook-cert$'
check "certManager.enabled: no permission on the configuration or the certificate Secret" \
  not_rendered "$work/render-cm" 'mutatingwebhookconfigurations|pullkeeper-webhook-cert"\]'
template_with --set podAdmission.webhook.enabled=true --set podAdmission.webhook.certManager.enabled=true \
  --set podAdmission.webhook.certManager.issuerRef.name=corp-ca \
  --set podAdmission.webhook.certManager.issuerRef.kind=ClusterIssuer >"$work/render-cm-issuer" 2>&1 || true
check "certManager.issuerRef: no Issuer of the chart's" count_kind "$work/render-cm-issuer" Issuer 0
check "... the Certificate names the given issuer" \
  grep -Pzo 'name: corp-ca\n\s+kind: ClusterIssuer' "$work/render-cm-issuer"
for opt in "admissionPolicy.enabled=false" "sourceSecrets.namespace=creds" "metrics.auth.enabled=true" \
  "metrics.bindAddress=127.0.0.1" "aggregateRoles.enabled=false" "podAdmission.webhook.enabled=true" \
  "workloadChecks.enabled=true"; do
  check "helm lint --strict --set $opt" helm_q lint --strict "$chart" --set "$opt"
done

echo "--- values.schema.json"
check "schema rejects replicas=abc" schema_rejects replicas --set replicas=abc
check "schema rejects an unknown top-level key" schema_rejects replica --set replica=2
check "schema rejects logFormat=xml" schema_rejects logFormat --set logFormat=xml
check "schema rejects image.pullPolicy=Sometimes" schema_rejects pullPolicy --set image.pullPolicy=Sometimes
check "schema rejects an unknown image key" schema_rejects imag --set image.name=x
check "schema rejects metrics.bindAddress=10.0.0.1" schema_rejects bindAddress --set metrics.bindAddress=10.0.0.1
check "schema rejects sourceSecrets.namespace=Not_A_Namespace" \
  schema_rejects namespace --set sourceSecrets.namespace=Not_A_Namespace
check "schema rejects an unknown admissionPolicy key" schema_rejects enable --set admissionPolicy.enable=true
check "schema rejects metrics.auth=true (it is an object)" schema_rejects auth --set metrics.auth=true
check "schema rejects podAdmission.webhook.timeoutSeconds=60" \
  schema_rejects timeoutSeconds --set podAdmission.webhook.timeoutSeconds=60
check "schema rejects an unknown podAdmission.webhook key" schema_rejects certmanager \
  --set podAdmission.webhook.certmanager.enabled=true
check "schema rejects a certManager.issuerRef.kind other than Issuer or ClusterIssuer" \
  schema_rejects kind --set podAdmission.webhook.certManager.issuerRef.kind=Vault
check "schema rejects workloadChecks.interval=soon" schema_rejects interval --set workloadChecks.interval=soon
check "schema rejects a workloadChecks.pullSecretNamespaces entry that is no namespace name" \
  schema_rejects pullSecretNamespaces --set 'workloadChecks.pullSecretNamespaces={Not_A_Namespace}'
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
# Every option at once, policies included (the cluster must accept their CEL).
template_with --api-versions "$vap_api" --set sourceSecrets.namespace="$ns" --set metrics.auth.enabled=true \
  --set 'admissionPolicy.extraTokenAudiences={vault}' --set workloadChecks.enabled=true \
  --set "workloadChecks.pullSecretNamespaces={$ns}" >"$work/render-all" 2>&1 || true
check "kubectl apply --dry-run=server accepts the policies and every option" dry_run "$work/render-all"
template_with --api-versions "$vap_api" --set podAdmission.webhook.enabled=true >"$work/render-wh-dry" 2>&1 || true
check "kubectl apply --dry-run=server accepts the webhook, its Service and RBAC" dry_run "$work/render-wh-dry"
"$kubectl" delete namespace "$ns" --wait=true --timeout=60s >/dev/null

echo "--- install"
# The pod admission policies are cluster-scoped with fixed names; an operator that ran
# with more rights than the chart's (the integration tests' own) may have created them,
# and Helm adopts nothing it did not create.
"$kubectl" delete mutatingadmissionpolicy pullkeeper.io-cluster-credentials \
  pullkeeper.io-namespaced-credentials --ignore-not-found >/dev/null 2>&1 || true
check "helm install into a fresh namespace" \
  helm_q install "$release" "$chart" -n "$ns" --create-namespace
installed=true
for crd in "${crds[@]}"; do
  check "CRD $crd is Established" crd_established "$crd"
done
check "Deployment exists" exists -n "$ns" deployment "$fullname"
check "the pod admission policies exist" \
  exists mutatingadmissionpolicy pullkeeper.io-cluster-credentials pullkeeper.io-namespaced-credentials
check "ServiceAccount exists" exists -n "$ns" serviceaccount "$fullname"
check "ClusterRole and ClusterRoleBinding exist" exists clusterrole,clusterrolebinding "$fullname"
check "Role and RoleBinding exist" exists -n "$ns" role,rolebinding "$fullname-leader-election"
check "metrics Service exists" exists -n "$ns" service "$fullname-metrics"
check "ValidatingAdmissionPolicies and bindings exist" \
  exists validatingadmissionpolicy,validatingadmissionpolicybinding \
  "$fullname-secrets" "$fullname-serviceaccounts" "$fullname-token-requests"
check "the policies type-check without warnings" policies_type_check
check "aggregated view and edit ClusterRoles exist" exists clusterrole "$fullname-view" "$fullname-edit"
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
check "SA may create serviceaccounts/token in every namespace" can create serviceaccounts --subresource token -A
check "SA may not create or patch RBAC" cannot create clusterrolebindings.rbac.authorization.k8s.io
check "SA may not escalate or bind roles" cannot bind clusterroles.rbac.authorization.k8s.io
check "SA may not create tokenreviews (metrics.auth is off)" cannot create tokenreviews.authentication.k8s.io
"$kubectl" create namespace "$ns-victim" >/dev/null
"$kubectl" -n "$ns-victim" create secret generic foreign --from-literal=a=b >/dev/null
"$kubectl" -n "$ns-victim" create serviceaccount robot >/dev/null
sa_token_secret_manifest "$ns-victim" >"$work/sa-token-secret.yaml"
pull_secret_manifest "$ns-victim" >"$work/pull-secret.yaml"
check "policy: SA may not create a service-account-token Secret" \
  denied_as_operator secrets create --dry-run=server -f "$work/sa-token-secret.yaml"
check "policy: SA may not create an Opaque Secret" \
  denied_as_operator secrets -n "$ns-victim" create secret generic x --from-literal=a=b --dry-run=server
check "policy: SA may not edit a foreign Secret" \
  denied_as_operator secrets -n "$ns-victim" label --dry-run=server secret foreign app.kubernetes.io/managed-by=pullkeeper
check "policy: SA may not delete a foreign Secret" denied_as_operator secrets -n "$ns-victim" delete --dry-run=server secret foreign
check "policy: SA may create its own pull secret" allowed_as_operator create --dry-run=server -f "$work/pull-secret.yaml"
check "policy: SA may not change a ServiceAccount's secrets" \
  denied_as_operator serviceaccounts -n "$ns-victim" patch --dry-run=server serviceaccount robot --type=json \
  -p '[{"op":"add","path":"/secrets","value":[{"name":"x"}]}]'
check "policy: SA may not label a ServiceAccount" \
  denied_as_operator serviceaccounts -n "$ns-victim" label --dry-run=server serviceaccount robot a=b
check "policy: SA may add imagePullSecrets to a ServiceAccount" \
  allowed_as_operator -n "$ns-victim" patch --dry-run=server serviceaccount robot --type=json \
  -p '[{"op":"add","path":"/imagePullSecrets","value":[{"name":"x"}]}]'
check "policy: SA may not request a token for the apiserver's audience" \
  denied_as_operator token-requests -n "$ns-victim" create token robot
check "policy: SA may request a token for sts.amazonaws.com" \
  allowed_as_operator -n "$ns-victim" create token robot --audience sts.amazonaws.com
"$kubectl" delete namespace "$ns-victim" --wait=false >/dev/null

echo "--- upgrade"
check "helm upgrade --set logLevel=debug" \
  helm_q upgrade "$release" "$chart" -n "$ns" --reuse-values --set logLevel=debug
check "the Deployment has the new PULLKEEPER_LOG" deployment_env "PULLKEEPER_LOG=debug"
check "the Deployment keeps PULLKEEPER_LOG_FORMAT=json" deployment_env "PULLKEEPER_LOG_FORMAT=json"
check "helm upgrade --set sourceSecrets.namespace=<release namespace> --set metrics.auth.enabled=true" \
  helm_q upgrade "$release" "$chart" -n "$ns" --reuse-values --set sourceSecrets.namespace="$ns" \
  --set metrics.auth.enabled=true
check "SA may get secrets in the source namespace" retrying can get secrets -n "$ns"
check "SA may not get secrets elsewhere" retrying cannot get secrets -n default
check "SA may still list secrets everywhere (it watches its own by label)" retrying can list secrets -A
check "SA may create tokenreviews" retrying can create tokenreviews.authentication.k8s.io
check "SA may create subjectaccessreviews" retrying can create subjectaccessreviews.authorization.k8s.io
check "the metrics-reader ClusterRole exists" exists clusterrole "$fullname-metrics-reader"
check "the Deployment has PULLKEEPER_SOURCE_SECRET_NAMESPACE" deployment_env "PULLKEEPER_SOURCE_SECRET_NAMESPACE=$ns"

echo "--- upgrade to workload checks"
check "SA may not list deployments before workloadChecks.enabled" cannot list deployments.apps -A
check "helm upgrade --set workloadChecks.enabled=true --set workloadChecks.pullSecretNamespaces={default}" \
  helm_q upgrade "$release" "$chart" -n "$ns" --reuse-values --set workloadChecks.enabled=true \
  --set 'workloadChecks.pullSecretNamespaces={default}'
check "the Deployment has PULLKEEPER_WORKLOAD_CHECKS=true" deployment_env "PULLKEEPER_WORKLOAD_CHECKS=true"
check "the Deployment has PULLKEEPER_WORKLOAD_CHECK_INTERVAL=10m" deployment_env "PULLKEEPER_WORKLOAD_CHECK_INTERVAL=10m"
for what in deployments.apps statefulsets.apps daemonsets.apps replicasets.apps jobs.batch cronjobs.batch pods; do
  check "SA may list and watch $what in every namespace" retrying can watch "$what" -A
done
check "SA may watch nodes" retrying can watch nodes
check "SA may still not get pods (list and watch only)" cannot get pods -n default
check "SA may not change deployments" cannot patch deployments.apps -n default
check "SA may get the pull Secrets of a listed namespace" retrying can get secrets -n default
check "SA may not get Secrets in an unlisted namespace" cannot get secrets -n kube-public

echo "--- upgrade to the pod admission webhook"
check "helm upgrade --set podAdmission.enabled=false --set podAdmission.webhook.enabled=true" \
  helm_q upgrade "$release" "$chart" -n "$ns" --reuse-values --set podAdmission.enabled=false \
  --set podAdmission.webhook.enabled=true
check "the MutatingWebhookConfiguration and webhook Service exist" \
  exists mutatingwebhookconfiguration/"$fullname" -n "$ns" service/"$fullname-webhook"
check "the Deployment has PULLKEEPER_POD_ADMISSION_WEBHOOK=true" deployment_env "PULLKEEPER_POD_ADMISSION_WEBHOOK=true"
check "SA may patch its MutatingWebhookConfiguration" \
  retrying can patch mutatingwebhookconfigurations.admissionregistration.k8s.io/"$fullname"
check "SA may not patch another MutatingWebhookConfiguration" \
  cannot patch mutatingwebhookconfigurations.admissionregistration.k8s.io/other
check "SA may not create MutatingWebhookConfigurations" \
  cannot create mutatingwebhookconfigurations.admissionregistration.k8s.io
tls_secret_manifest "$ns" "$fullname-webhook-cert" >"$work/webhook-cert.yaml"
tls_secret_manifest "$ns" other-tls >"$work/other-tls.yaml"
tls_secret_manifest default "$fullname-webhook-cert" >"$work/elsewhere-tls.yaml"
check "policy: SA may write its webhook certificate Secret" \
  retrying allowed_as_operator create --dry-run=server -f "$work/webhook-cert.yaml"
check "policy: SA may not write another kubernetes.io/tls Secret" \
  denied_as_operator secrets create --dry-run=server -f "$work/other-tls.yaml"
check "policy: SA may not write that Secret in another namespace" \
  denied_as_operator secrets create --dry-run=server -f "$work/elsewhere-tls.yaml"

echo "--- uninstall"
check "helm uninstall" helm_q uninstall "$release" -n "$ns" --wait
installed=false
check "Deployment, ServiceAccount, Service, Role, RoleBinding are gone" \
  gone -n "$ns" deployment/"$fullname" serviceaccount/"$fullname" service/"$fullname-metrics" \
  role/"$fullname-leader-election" rolebinding/"$fullname-leader-election"
check "ClusterRoles and ClusterRoleBinding are gone" \
  gone clusterrole/"$fullname" clusterrolebinding/"$fullname" clusterrole/"$fullname-view" \
  clusterrole/"$fullname-metrics-reader"
check "the MutatingWebhookConfiguration is gone" gone mutatingwebhookconfiguration/"$fullname"
check "the workload checks' pull-secrets Role and RoleBinding are gone" \
  gone -n default role/"$fullname-pull-secrets" rolebinding/"$fullname-pull-secrets"
check "the admission policies are gone" gone validatingadmissionpolicy/"$fullname-secrets" \
  validatingadmissionpolicybinding/"$fullname-secrets"
check "CRDs are kept (Helm never deletes CRDs)" exists crd "${crds[@]}"

echo "$passed passed, $failed failed"
[[ "$failed" -eq 0 ]]
