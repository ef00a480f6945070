{{/*
Names the code spells too. These must equal the constants in
crates/embedfleet-proto/src/subjects.rs (JOB_STREAM, model_consumer_name): KEDA reads the
consumer by this name, and a drift silently breaks autoscaling. The Rust test
crates/embedfleet-proto/tests/chart_names.rs and scripts/chart-test.py fail when they differ.
*/}}
{{- define "embedfleet.jobStream" -}}EMBEDFLEET_JOBS{{- end -}}
{{- define "embedfleet.consumerPrefix" -}}embedfleet-model-{{- end -}}

{{- define "embedfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "embedfleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "embedfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "embedfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "embedfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "embedfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "embedfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image reference; `image` is a {repository, tag} map (global or a group's own). */}}
{{- define "embedfleet.image" -}}
{{- $image := .image -}}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) -}}
{{- end -}}

{{/*
A group merged over workerDefaults, as JSON. Written by hand because sprig's mergeOverwrite
skips "empty" values: a group's `autoscaling.enabled: false` or `fallback.replicas: 0` would be
ignored. Maps merge key by key, everything else (lists included) is replaced.
*/}}
{{- define "embedfleet.deepMerge" -}}
{{- $base := deepCopy .base -}}
{{- range $key, $value := .over -}}
{{- if and (kindIs "map" $value) (kindIs "map" (get $base $key)) -}}
{{- $_ := set $base $key (include "embedfleet.deepMerge" (dict "base" (get $base $key) "over" $value) | fromJson) -}}
{{- else -}}
{{- $_ := set $base $key $value -}}
{{- end -}}
{{- end -}}
{{- toJson $base -}}
{{- end -}}

{{/* Usage: include "embedfleet.group" (dict "root" $ "group" $group) | fromJson */}}
{{- define "embedfleet.group" -}}
{{- $defaults := deepCopy .root.Values.workerDefaults -}}
{{- $_ := set $defaults "gpu" (dict "count" 0 "type" "nvidia.com/gpu" "product" "") -}}
{{- $_ := set $defaults "replicas" 1 -}}
{{- $_ := set $defaults "nodeSelector" (dict) -}}
{{- $_ := set $defaults "tolerations" (list) -}}
{{- $_ := set $defaults "affinity" (dict) -}}
{{- $_ := set $defaults "extraArgs" (list) -}}
{{- $_ := set $defaults "extraEnv" (list) -}}
{{- $_ := set $defaults "image" (deepCopy .root.Values.image) -}}
{{- include "embedfleet.deepMerge" (dict "base" $defaults "over" .group) -}}
{{- end -}}

{{- define "embedfleet.workerName" -}}
{{- printf "%s-worker-%s" (include "embedfleet.fullname" .root) .group.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* NATS and Redis URLs as environment, from a Secret when one is named. */}}
{{- define "embedfleet.connectionEnv" -}}
- name: EMBEDFLEET_NATS_URL
{{- if .Values.nats.urlSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.nats.urlSecret.name }}
      key: {{ .Values.nats.urlSecret.key }}
{{- else }}
  value: {{ .Values.nats.url | quote }}
{{- end }}
- name: EMBEDFLEET_LOG
  value: {{ .Values.logLevel | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* One role's NATS credentials and TLS settings (dict root, secret, user) as environment that
     points into its Secret, mounted at /etc/embedfleet/nats by "embedfleet.authMount". */}}
{{- define "embedfleet.natsAuthEnv" -}}
{{- if .secret }}
{{- $vars := dict "creds" "EMBEDFLEET_NATS_CREDS" "nkeySeed" "EMBEDFLEET_NATS_NKEY_SEED_FILE" "password" "EMBEDFLEET_NATS_PASSWORD_FILE" "token" "EMBEDFLEET_NATS_TOKEN_FILE" "tlsCa" "EMBEDFLEET_NATS_TLS_CA" "tlsCert" "EMBEDFLEET_NATS_TLS_CERT" "tlsKey" "EMBEDFLEET_NATS_TLS_KEY" }}
{{- range $file, $var := $vars }}
{{- with get $.root.Values.nats.auth.files $file }}
- name: {{ $var }}
  value: /etc/embedfleet/nats/{{ . }}
{{- end }}
{{- end }}
{{- with .user }}
- name: EMBEDFLEET_NATS_USER
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The coordinators' Redis AUTH and TLS settings, pointing into /etc/embedfleet/redis. */}}
{{- define "embedfleet.redisAuthEnv" -}}
{{- $auth := .Values.redis.auth }}
{{- if $auth.secret }}
{{- $vars := dict "password" "EMBEDFLEET_REDIS_PASSWORD_FILE" "tlsCa" "EMBEDFLEET_REDIS_TLS_CA" "tlsCert" "EMBEDFLEET_REDIS_TLS_CERT" "tlsKey" "EMBEDFLEET_REDIS_TLS_KEY" }}
{{- range $file, $var := $vars }}
{{- with get $auth.files $file }}
- name: {{ $var }}
  value: /etc/embedfleet/redis/{{ . }}
{{- end }}
{{- end }}
{{- with $auth.user }}
- name: EMBEDFLEET_REDIS_USER
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "embedfleet.redisEnv" -}}
{{- if .Values.redis.urlSecret.name }}
- name: EMBEDFLEET_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.urlSecret.name }}
      key: {{ .Values.redis.urlSecret.key }}
{{- else if .Values.redis.url }}
- name: EMBEDFLEET_REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- end }}
{{- end -}}

{{/* startup and readiness on /readyz (models loaded, NATS connected), liveness on /healthz. */}}
{{- define "embedfleet.probes" -}}
startupProbe:
  httpGet: {path: /readyz, port: http}
  periodSeconds: {{ .startup.periodSeconds | int }}
  failureThreshold: {{ .startup.failureThreshold | int }}
  timeoutSeconds: 3
readinessProbe:
  httpGet: {path: /readyz, port: http}
  periodSeconds: {{ .readiness.periodSeconds | int }}
  failureThreshold: {{ .readiness.failureThreshold | int }}
  timeoutSeconds: 3
livenessProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: {{ .liveness.periodSeconds | int }}
  failureThreshold: {{ .liveness.failureThreshold | int }}
  timeoutSeconds: 3
{{- end -}}
