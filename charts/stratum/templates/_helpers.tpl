{{/* Names, labels and image references shared by the templates. */}}

{{- define "stratum.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stratum.fullname" -}}
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

{{- define "stratum.operatorName" -}}
{{- printf "%s-operator" (include "stratum.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stratum.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "stratum.operatorName" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The ClusterRole every TimeService's agents are bound to. Fixed (not derived from the release),
because the operator binds it by this name (docs/contracts.md) and holds `bind` on it only.
*/}}
{{- define "stratum.agentClusterRoleName" -}}
stratum-agent
{{- end }}

{{- define "stratum.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/part-of: stratum
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "stratum.operatorSelectorLabels" -}}
app.kubernetes.io/name: stratum-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* stratum.labels already carries app.kubernetes.io/instance, the selector's other label. */}}
{{- define "stratum.operatorLabels" -}}
{{ include "stratum.labels" . }}
app.kubernetes.io/name: stratum-operator
app.kubernetes.io/component: operator
{{- end }}

{{/*
image: registry/repository:tag or @digest. The image's own registry and tag win over the
chart-wide `image` ones; the tag defaults to the chart's appVersion.
Call with (dict "image" .Values.operator.image "global" .Values.image "chart" .Chart).
*/}}
{{- define "stratum.image" -}}
{{- $registry := default .global.registry .image.registry }}
{{- $ref := .image.repository }}
{{- if $registry }}{{ $ref = printf "%s/%s" $registry .image.repository }}{{ end }}
{{- if .image.digest }}
{{- printf "%s@%s" $ref .image.digest }}
{{- else }}
{{- printf "%s:%s" $ref (default .chart.AppVersion (default .global.tag .image.tag)) }}
{{- end }}
{{- end }}

{{/* Username prefix of every ServiceAccount in the release namespace (where agents live). */}}
{{- define "stratum.saUserPrefix" -}}
{{- printf "system:serviceaccount:%s:" .Release.Namespace }}
{{- end }}
