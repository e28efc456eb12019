{{/*
Helpers shared by every template. Each helper says what it is for; templates
never build names or labels by hand, so renaming or relabelling happens here.
*/}}

{{/*
Chart name, or .Values.nameOverride. Also the Prometheus `job` label: the
ServiceMonitor/PodMonitor set `jobLabel: app.kubernetes.io/name`, so the
dashboard and alert rules can select job="echo-service" for every release.
Truncated to 63 characters (DNS label limit).
*/}}
{{- define "echo-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, plus the chart name unless the
release name already contains it. Used for every object name.
Truncated to 63 characters (DNS label limit).
*/}}
{{- define "echo-service.fullname" -}}
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
"name-version" for the helm.sh/chart label.
*/}}
{{- define "echo-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels for the metadata of every object: the selector labels, the
recommended app.kubernetes.io/* labels, and .Values.commonLabels.
*/}}
{{- define "echo-service.labels" -}}
helm.sh/chart: {{ include "echo-service.chart" . }}
{{ include "echo-service.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: echo-service
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of the pod template: the selector labels plus labels that do not change
between chart versions. No helm.sh/chart or app.kubernetes.io/version here: a
label change on the pod template is a rollout, and a chart bump alone must not
restart every pod.
*/}}
{{- define "echo-service.podLabels" -}}
{{ include "echo-service.selectorLabels" . }}
app.kubernetes.io/part-of: echo-service
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Namespace of every namespaced object: .Values.namespaceOverride, else the
release namespace (for umbrella charts that install into several namespaces).
*/}}
{{- define "echo-service.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the admin Service (ClusterIP, admin port only).
*/}}
{{- define "echo-service.adminServiceName" -}}
{{- printf "%s-admin" (include "echo-service.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/*
Labels that tell the admin Service apart from the echo Service; the
ServiceMonitor selects on them.
*/}}
{{- define "echo-service.adminServiceLabels" -}}
{{ include "echo-service.selectorLabels" . }}
app.kubernetes.io/component: admin
{{- end }}

{{/*
Selector labels: the immutable subset used by the Deployment selector, the
Service, the PDB, the NetworkPolicy and the monitors. Never add to these in an
upgrade (Deployment selectors cannot change).
*/}}
{{- define "echo-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "echo-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of the helm test pod. Deliberately not the selector labels (the Service
and PDB must not pick the test pod up); the NetworkPolicy lets these in.
*/}}
{{- define "echo-service.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "echo-service.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
{{- end }}

{{/*
Name of the ServiceAccount the pods run as: the chart's own when
serviceAccount.create, else serviceAccount.name (or "default").
*/}}
{{- define "echo-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "echo-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image reference. A digest, when set, wins over the tag; the tag
defaults to the chart's appVersion so chart and binary versions move together.
*/}}
{{- define "echo-service.image" -}}
{{- include "echo-service.imageRef" (dict "image" .Values.image "global" .Values.global "defaultTag" .Chart.AppVersion) }}
{{- end }}

{{/*
An image reference from {registry, repository, tag, digest}:
global.imageRegistry when set (a mirror for every image), else the image's own
registry, prefixed to the repository; the digest wins over the tag. Called with (dict "image" ... "global" ... "defaultTag" ...).
*/}}
{{- define "echo-service.imageRef" -}}
{{- $img := .image }}
{{- $registry := default $img.registry ((.global | default dict).imageRegistry) }}
{{- $repo := $img.repository }}
{{- if $registry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" $registry) $repo }}
{{- end }}
{{- if $img.digest }}
{{- printf "%s@%s" $repo $img.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .defaultTag $img.tag | toString) }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds, derived rather than configured, so that the
whole shutdown fits: the preStop sleep (endpoints are removed meanwhile), the
service's drain delay (readiness 503, still accepting), its shutdown timeout
(listener closed, open connections finish or are aborted) and a margin for
process exit. Kubelet SIGKILLs the container when this runs out.
*/}}
{{- define "echo-service.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- add $s.preStopSleepSeconds $s.drainDelaySeconds $s.timeoutSeconds $s.graceMarginSeconds }}
{{- end }}

{{/*
OTEL_RESOURCE_ATTRIBUTES: the Kubernetes identity of the pod (filled from the
downward API env vars POD_NAME/POD_NAMESPACE/NODE_NAME via $(VAR) expansion)
followed by .Values.otel.resourceAttributes, sorted so renders are stable.
*/}}
{{- define "echo-service.otelResourceAttributes" -}}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.node.name=$(NODE_NAME)" (printf "k8s.deployment.name=%s" (include "echo-service.fullname" .)) }}
{{- range $k, $v := .Values.otel.resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%v" $k $v) }}
{{- end }}
{{- join "," $attrs }}
{{- end }}

{{/*
Pod security context for pods this chart creates besides the service (the
helm test pod): the same restricted settings as the service.
*/}}
{{- define "echo-service.restrictedContainerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Name of the kubernetes.io/tls Secret the pods mount for the TLS echo port:
tls.secretName, or "<fullname>-tls" for the Secret a cert-manager Certificate
writes when tls.certManager.enabled and no name is given.
*/}}
{{- define "echo-service.tlsSecretName" -}}
{{- if .Values.tls.secretName }}
{{- .Values.tls.secretName }}
{{- else if .Values.tls.certManager.enabled }}
{{- printf "%s-tls" (include "echo-service.fullname" . | trunc 59 | trimSuffix "-") }}
{{- else }}
{{- fail "tls.enabled needs tls.secretName (an existing kubernetes.io/tls Secret) or tls.certManager.enabled" }}
{{- end }}
{{- end }}

{{/*
ECHO_FAULTS from .Values.faults: each entry's JSON fields as a `--fault` spec
(kind and keys in kebab-case, peers joined with "|"), entries joined with ";".
*/}}
{{- define "echo-service.faultSpecs" -}}
{{- $specs := list -}}
{{- range .Values.faults -}}
{{- $parts := list (.kind | replace "_" "-") -}}
{{- range $key, $value := omit . "kind" -}}
{{- if eq $key "peers" -}}
{{- $parts = append $parts (printf "peers=%s" (join "|" $value)) -}}
{{- else if and (kindIs "float64" $value) (eq (floor $value) $value) -}}
{{- $parts = append $parts (printf "%s=%d" ($key | replace "_" "-") (int64 $value)) -}}
{{- else -}}
{{- $parts = append $parts (printf "%s=%v" ($key | replace "_" "-") $value) -}}
{{- end -}}
{{- end -}}
{{- $specs = append $specs (join "," $parts) -}}
{{- end -}}
{{- join ";" $specs -}}
{{- end -}}
