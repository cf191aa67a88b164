{{/*
The chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "pullkeeper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of every resource: the release name, plus the chart name unless the
release name already contains it.
*/}}
{{- define "pullkeeper.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
chart-version, for the helm.sh/chart label.
*/}}
{{- define "pullkeeper.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "pullkeeper.labels" -}}
helm.sh/chart: {{ include "pullkeeper.chart" . }}
{{ include "pullkeeper.selectorLabels" . }}
app.kubernetes.io/version: {{ (.Values.image.tag | default .Chart.AppVersion) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: pullkeeper
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the operator's pods. Immutable in a Deployment: never add to these.
*/}}
{{- define "pullkeeper.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pullkeeper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "pullkeeper.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pullkeeper.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image: repository:tag (tag defaults to appVersion), or repository@digest.
*/}}
{{- define "pullkeeper.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
"true" when /metrics listens on loopback only (reachable from inside the pod only).
*/}}
{{- define "pullkeeper.metricsLoopback" -}}
{{- if has .Values.metrics.bindAddress (list "127.0.0.1" "::1") }}true{{ end }}
{{- end }}

{{/*
PULLKEEPER_METRICS_ADDR: bindAddress:8080, IPv6 addresses in brackets.
*/}}
{{- define "pullkeeper.metricsAddr" -}}
{{- if contains ":" .Values.metrics.bindAddress }}
{{- printf "[%s]:8080" .Values.metrics.bindAddress }}
{{- else }}
{{- printf "%s:8080" .Values.metrics.bindAddress }}
{{- end }}
{{- end }}

{{/*
"true" when the pod admission webhook is the route in use: opted in, and the
MutatingAdmissionPolicy route turned off or not served (the policy wins where both are
possible; the operator decides the same way).
*/}}
{{- define "pullkeeper.webhookRoute" -}}
{{- if and .Values.podAdmission.webhook.enabled (or (not .Values.podAdmission.enabled) (not (.Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy"))) }}true{{ end }}
{{- end }}

{{/*
"true" when the operator manages the webhook's serving certificate (not cert-manager).
*/}}
{{- define "pullkeeper.webhookCertManaged" -}}
{{- if and (include "pullkeeper.webhookRoute" .) (not .Values.podAdmission.webhook.certManager.enabled) }}true{{ end }}
{{- end }}

{{/*
Namespaces the webhook skips: podAdmission.webhook.skipNamespaces and the release's own.
*/}}
{{- define "pullkeeper.webhookSkip" -}}
{{- concat .Values.podAdmission.webhook.skipNamespaces (list .Release.Namespace) | uniq | toJson }}
{{- end }}
