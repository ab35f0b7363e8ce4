{{/* Names and labels, as `helm create` lays them out. */}}
{{- define "voiceclone-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "voiceclone-worker.fullname" -}}
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

{{- define "voiceclone-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "voiceclone-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "voiceclone-worker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "voiceclone-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "voiceclone-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "voiceclone-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "voiceclone-worker.secretName" -}}
{{- default (include "voiceclone-worker.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* A worker setting the chart itself needs: from .Values.config, required. */}}
{{- define "voiceclone-worker.setting" -}}
{{- $name := index . 1 }}
{{- required (printf "config.%s is required by the chart" $name) (index (index . 0).Values.config $name) }}
{{- end }}

{{/* The requests topic's partition count: the most replicas that all get work. */}}
{{- define "voiceclone-worker.partitions" -}}
{{- include "voiceclone-worker.setting" (list . "VOICECLONE_KAFKA__TOPIC_PARTITIONS") | int }}
{{- end }}

{{/* KEDA's replica cap: autoscaling.maxReplicas, or the partition count; never above it. */}}
{{- define "voiceclone-worker.maxReplicas" -}}
{{- $partitions := include "voiceclone-worker.partitions" . | int }}
{{- $max := .Values.autoscaling.maxReplicas | int }}
{{- if gt $max $partitions }}
{{- fail (printf "autoscaling.maxReplicas (%d) exceeds the requests topic's %d partitions (config.VOICECLONE_KAFKA__TOPIC_PARTITIONS): the extra workers would get no partitions" $max $partitions) }}
{{- end }}
{{- ternary $partitions $max (eq $max 0) }}
{{- end }}

{{/* Seconds from SIGTERM to SIGKILL: the worker's drain grace plus the margin for closing. */}}
{{- define "voiceclone-worker.terminationGracePeriodSeconds" -}}
{{- $grace := include "voiceclone-worker.setting" (list . "VOICECLONE_SHUTDOWN_GRACE_SECONDS") | float64 | ceil | int }}
{{- add $grace (.Values.terminationMarginSeconds | int) }}
{{- end }}
