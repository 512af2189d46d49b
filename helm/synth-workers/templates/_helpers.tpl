{{/* Chart name. */}}
{{- define "synth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (release-based). */}}
{{- define "synth.fullname" -}}
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

{{- define "synth.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "synth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: synth-workers
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "worker" "pool" "email"). */}}
{{- define "synth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "synth.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .pool }}
synth-workers.io/pool: {{ . }}
{{- end }}
{{- end }}

{{- define "synth.configName" -}}
{{ include "synth.fullname" . }}-config
{{- end }}

{{- define "synth.secretName" -}}
{{- if .Values.secret.existingSecret }}{{ .Values.secret.existingSecret }}{{ else }}{{ include "synth.fullname" . }}{{ end }}
{{- end }}

{{- define "synth.flowerSecretName" -}}
{{- if .Values.flower.auth.existingSecret }}{{ .Values.flower.auth.existingSecret }}{{ else }}{{ include "synth.fullname" . }}-flower-auth{{ end }}
{{- end }}

{{- define "synth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ default (include "synth.fullname" .) .Values.serviceAccount.name }}{{ else }}{{ default "default" .Values.serviceAccount.name }}{{ end }}
{{- end }}

{{/* Image reference; call with (dict "ctx" $ "gpu" bool). */}}
{{- define "synth.image" -}}
{{- $img := ternary .ctx.Values.gpuImage .ctx.Values.image (default false .gpu) }}
{{- printf "%s:%s" $img.repository (default .ctx.Chart.AppVersion $img.tag) }}
{{- end }}

{{- define "synth.pullPolicy" -}}
{{- $img := ternary .ctx.Values.gpuImage .ctx.Values.image (default false .gpu) }}
{{- $img.pullPolicy }}
{{- end }}

{{/* Pod-level fields every pod shares. */}}
{{- define "synth.podCommon" -}}
serviceAccountName: {{ include "synth.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container security context (restricted Pod Security). */}}
{{- define "synth.containerSecurityContext" -}}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end }}

{{/* Settings for every platform container: ConfigMap + Secret, extra env. */}}
{{- define "synth.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "synth.configName" . }}
  - secretRef:
      name: {{ include "synth.secretName" . }}
{{- with .Values.extraEnv }}
env:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The writable /tmp, and the TLS files when tls.existingSecret names a Secret. */}}
{{- define "synth.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- with .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ . }}
    # Group-readable only (fsGroup): libpq refuses a client key others can read.
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "synth.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.tls.existingSecret }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Pod template annotations: roll pods when settings change. */}}
{{- define "synth.podAnnotations" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if not .Values.secret.existingSecret }}
checksum/secret: {{ toJson .Values.secret.data | sha256sum }}
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Grace period of a pool: longest task + soft shutdown + 15 s margin. */}}
{{- define "synth.poolGrace" -}}
{{- add (int .pool.longestTaskSeconds) (int .ctx.Values.softShutdownSeconds) 15 }}
{{- end }}

{{/* Kombu's Redis list names of queue .queue, one per priority step 0..9. */}}
{{- define "synth.priorityLists" -}}
{{- $lists := list .queue }}
{{- range $n := untilStep 1 10 1 }}
{{- $lists = append $lists (printf "%s\x06\x16%d" $.queue $n) }}
{{- end }}
{{- toJson $lists }}
{{- end }}
