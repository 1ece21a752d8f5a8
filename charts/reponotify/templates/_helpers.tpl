{{/* Names */}}

{{- define "reponotify.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "reponotify.fullname" -}}
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

{{- define "reponotify.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "reponotify.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reponotify.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "reponotify.labels" -}}
helm.sh/chart: {{ include "reponotify.chart" . }}
{{ include "reponotify.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: reponotify
{{- end }}

{{- define "reponotify.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "reponotify.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "reponotify.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The Secret holding the receiver's bearer token, and its key. */}}
{{- define "reponotify.tokenSecretName" -}}
{{- default (printf "%s-token" (include "reponotify.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "reponotify.tokenSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{- define "reponotify.claimName" -}}
{{- default (printf "%s-state" (include "reponotify.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/*
RBAC: the documented rules, exactly (values.yaml, rbac). The namespaced rules go into the
ClusterRole, or into a Role per watched namespace; the cluster-scoped ones are always a ClusterRole.
*/}}
{{- define "reponotify.rbac.namespacedRules" -}}
- apiGroups: ["reponotify.dev"]
  resources: ["repositorynotifications"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["reponotify.dev"]
  resources: ["repositorynotifications/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}

{{- define "reponotify.rbac.clusterRules" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* The operator's environment: every option as REPONOTIFY_<OPTION>. */}}
{{- define "reponotify.env" -}}
- name: REPONOTIFY_HOST
  value: "0.0.0.0"
- name: REPONOTIFY_PORT
  value: {{ .Values.ports.http | quote }}
- name: REPONOTIFY_LIVENESS
  value: {{ printf "http://0.0.0.0:%v/healthz" .Values.ports.liveness | quote }}
- name: REPONOTIFY_STATE_DIR
  value: {{ .Values.persistence.mountPath | quote }}
{{- with .Values.watchNamespaces }}
- name: REPONOTIFY_NAMESPACE
  value: {{ join " " . | quote }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: REPONOTIFY_TOKEN_FILE
  value: /etc/reponotify/token/token
{{- end }}
{{- if .Values.auth.hmac.existingSecret }}
- name: REPONOTIFY_HMAC_SECRET_FILE
  value: /etc/reponotify/hmac/secret
{{- end }}
{{- with .Values.allowTargets }}
- name: REPONOTIFY_ALLOW_TARGETS
  value: {{ join "," . | quote }}
{{- end }}
{{- if .Values.smtp.host }}
- name: REPONOTIFY_SMTP_HOST
  value: {{ .Values.smtp.host | quote }}
- name: REPONOTIFY_SMTP_PORT
  value: {{ .Values.smtp.port | quote }}
- name: REPONOTIFY_SMTP_SECURITY
  value: {{ .Values.smtp.security | quote }}
{{- with .Values.smtp.username }}
- name: REPONOTIFY_SMTP_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- with .Values.smtp.from }}
- name: REPONOTIFY_SMTP_FROM
  value: {{ . | quote }}
{{- end }}
{{- if .Values.smtp.existingSecret }}
- name: REPONOTIFY_SMTP_PASSWORD_FILE
  value: /etc/reponotify/smtp/password
{{- end }}
{{- if .Values.smtp.caSecret }}
- name: REPONOTIFY_SMTP_CA_FILE
  value: /etc/reponotify/smtp-ca/ca.crt
{{- end }}
{{- end }}
{{- if not .Values.smtp.emailVerification }}
- name: REPONOTIFY_NO_EMAIL_VERIFICATION
  value: "true"
{{- end }}
{{- range $key, $value := .Values.config }}
{{- if not (kindIs "invalid" $value) }}
- name: {{ printf "REPONOTIFY_%s" ($key | snakecase | upper) }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}
- name: PYTHONUNBUFFERED
  value: "1"
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: TMPDIR
  value: /tmp
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
