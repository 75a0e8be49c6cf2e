{{/* Names, labels and the table of Parley's services. */}}

{{- define "parley.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "parley.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "parley.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "parley.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "parley.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "parley.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: parley
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "chat"). */}}
{{- define "parley.selectorLabels" -}}
app.kubernetes.io/name: {{ include "parley.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
The services: what `parley serve` calls each, and which ports it has. `grpc`: serves gRPC on 50051 (with
grpc.health.v1); `http`: the public API on 8080 (with /healthz, /readyz, /metrics); otherwise health
and metrics are on the admin port 9090. `calls`: the services whose gRPC it calls (NetworkPolicy).
`backlog`: the JetStream stream and durable consumer it works through (KEDA can scale on it).
*/}}
{{- define "parley.components" -}}
gateway: {serve: api-gateway, grpc: false, http: true, calls: [user, chat, quota, analytics, agent]}
user: {serve: user, grpc: true, http: false, calls: []}
chat: {serve: chat, grpc: true, http: false, calls: []}
quota: {serve: quota, grpc: true, http: false, calls: []}
analytics: {serve: analytics, grpc: true, http: false, calls: [], backlog: {stream: USAGE, consumer: analytics}}
agent: {serve: agent, grpc: true, http: false, calls: [chat, quota], backlog: {stream: JOBS, consumer: agent}}
{{- end -}}

{{- define "parley.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "parley.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "parley.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding database, Redis and NATS URLs when no existing Secret is named. */}}
{{- define "parley.connectionSecret" -}}
{{- printf "%s-connections" (include "parley.fullname" .) -}}
{{- end -}}

{{- define "parley.keysSecret" -}}
{{- default (printf "%s-keys" (include "parley.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "parley.providerKeysSecret" -}}
{{- default (printf "%s-provider-keys" (include "parley.fullname" .)) .Values.providerKeysExistingSecret -}}
{{- end -}}

{{/* Environment variables with credentials, each from its Secret. */}}
{{- define "parley.secretEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "parley.connectionSecret" .) .Values.database.existingSecret }}
      key: DATABASE_URL
- name: DATABASE_REPLICA_URLS
  valueFrom:
    secretKeyRef:
      name: {{ default (include "parley.connectionSecret" .) .Values.database.existingSecret }}
      key: DATABASE_REPLICA_URLS
      optional: true
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "parley.connectionSecret" .) .Values.redis.existingSecret }}
      key: REDIS_URL
- name: NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "parley.connectionSecret" .) .Values.nats.existingSecret }}
      key: NATS_URL
- name: PARLEY_SECRETS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "parley.keysSecret" . }}
      key: PARLEY_SECRETS_KEY
- name: PARLEY_CURSOR_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "parley.keysSecret" . }}
      key: PARLEY_CURSOR_SECRET
- name: PARLEY_CONTENT_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "parley.keysSecret" . }}
      key: PARLEY_CONTENT_KEYS
{{- end -}}

{{/* OTEL_RESOURCE_ATTRIBUTES for one component. */}}
{{- define "parley.resourceAttributes" -}}
{{- $attributes := list (printf "service.namespace=%s" .root.Release.Namespace) (printf "service.version=%s" .root.Chart.AppVersion) "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" (printf "k8s.deployment.name=%s-%s" (include "parley.fullname" .root) .component) -}}
{{- range $key, $value := .root.Values.telemetry.resourceAttributes -}}
{{- $attributes = append $attributes (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $attributes -}}
{{- end -}}

{{/* The hardened container security context every container gets. */}}
{{- define "parley.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "parley.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}
