{{- define "veil.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "veil.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
veil.dev/tee: {{ .Values.tee.mode }}
{{- end -}}

{{- define "veil.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "veil.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "veil.simulated" -}}
{{- if eq .Values.tee.mode "simulated" -}}true{{- else if eq .Values.tee.mode "sgx" -}}false{{- else -}}{{- fail "tee.mode must be simulated or sgx" -}}{{- end -}}
{{- end -}}

{{- define "veil.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "veil.kmsUrl" -}}
{{ ternary "https" "http" (not (empty .Values.kms.tlsSecret)) }}://{{ include "veil.fullname" . }}-kms.{{ .Release.Namespace }}.svc:{{ .Values.kms.port }}
{{- end -}}
