{{/* The release's full name: the release name, or release-chart. */}}
{{- define "csi-composefs.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "csi-composefs.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "csi-composefs.labels" -}}
{{ include "csi-composefs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: csi-composefs
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "csi-composefs.serviceAccountName" -}}
{{- default (include "csi-composefs.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "csi-composefs.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* The CSI socket's directory on the host (and in the plugin container). */}}
{{- define "csi-composefs.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end -}}

{{/* The trust policy's ConfigMap, or "" without a policy. */}}
{{- define "csi-composefs.trustPolicyConfigMap" -}}
{{- with .Values.trustPolicy -}}
{{- if .existingConfigMap -}}
{{ .existingConfigMap }}
{{- else if .sources -}}
{{ include "csi-composefs.fullname" $ }}-trust-policy
{{- end -}}
{{- end -}}
{{- end -}}
