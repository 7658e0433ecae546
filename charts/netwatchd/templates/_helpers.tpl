{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "netwatchd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name when it already contains the chart name. */}}
{{- define "netwatchd.fullname" -}}
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

{{- define "netwatchd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "netwatchd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "netwatchd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "netwatchd.labels" -}}
helm.sh/chart: {{ include "netwatchd.chart" . }}
{{ include "netwatchd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: node-agent
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "netwatchd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "netwatchd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "netwatchd.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/* Where the kubeletCA ConfigMap is mounted. */}}
{{- define "netwatchd.kubeletCADir" -}}
/etc/netwatchd/kubelet-ca
{{- end }}

{{/*
A flag value as the daemon expects it: whole numbers without an exponent or a fraction (Helm reads YAML
numbers as float64, whose default format turns 1000000 into 1e+06).
*/}}
{{- define "netwatchd.flagValue" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
The container's args: `netwatchd`, --listen from .Values.metrics, then one flag per key of .Values.config
(camelCase key -> --kebab-case flag; null/"" omitted, true -> bare flag, false omitted, a list -> one flag
per item), then .Values.extraArgs. Rendered as a YAML list.
*/}}
{{- define "netwatchd.args" -}}
{{- $config := deepCopy .Values.config }}
{{- if .Values.kubeletCA.configMap }}
{{- $_ := set $config "kubeletCaFile" (printf "%s/%s" (include "netwatchd.kubeletCADir" .) .Values.kubeletCA.key) }}
{{- end }}
- netwatchd
- {{ printf "--listen=%s:%s" (toString .Values.metrics.bindAddress) (include "netwatchd.flagValue" .Values.metrics.port) | quote }}
{{- range $key := keys $config | sortAlpha }}
{{- $value := index $config $key }}
{{- $flag := printf "--%s" (kebabcase $key) }}
{{- if kindIs "slice" $value }}
{{- range $value }}
- {{ printf "%s=%s" $flag (include "netwatchd.flagValue" .) | quote }}
{{- end }}
{{- else if kindIs "bool" $value }}
{{- if $value }}
- {{ $flag | quote }}
{{- end }}
{{- else if not (or (kindIs "invalid" $value) (eq (toString $value) "")) }}
- {{ printf "%s=%s" $flag (include "netwatchd.flagValue" $value) | quote }}
{{- end }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ toString . | quote }}
{{- end }}
{{- end }}

{{/* True ("true") when the container gets CAP_SYS_ADMIN or is privileged: no_new_privs is then meaningless. */}}
{{- define "netwatchd.mayEscalate" -}}
{{- $caps := list }}
{{- range .Values.securityContext.capabilities.add }}{{ $caps = append $caps (upper . | trimPrefix "CAP_") }}{{ end }}
{{- if or .Values.securityContext.privileged (has "SYS_ADMIN" $caps) }}true{{ end }}
{{- end }}

{{/* Name of the SecurityContextConstraints (cluster-scoped: namespaced by release). */}}
{{- define "netwatchd.sccName" -}}
{{- printf "%s-%s" (include "netwatchd.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" }}
{{- end }}
