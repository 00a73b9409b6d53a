{{/* The release's name, cut to what Kubernetes and KubeRay allow (KubeRay appends its own suffixes). */}}
{{- define "serving.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "serving.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* What the PodMonitors select on: the pods of this release only. */}}
{{- define "serving.podLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "serving.authSecret" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-auth" (include "serving.fullname" .)) -}}
{{- end -}}

{{/* The generated Ray Serve config (files/serve-config.yaml, from `serving serve-config`). */}}
{{- define "serving.serveConfig" -}}
{{- .Files.Get "files/serve-config.yaml" -}}
{{- end -}}

{{/*
Environment of every Ray container. RAY_AUTH_MODE and RAY_AUTH_TOKEN are what KubeRay's authOptions
inject too; they are set here so that the rendered manifest shows them, and KubeRay keeps what is set.
*/}}
{{- define "serving.env" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "serving.authSecret" . }}
      key: auth_token
{{- /* Ray Serve's short request path, as `serving serve` sets it (serving.ops.launch.FAST_PATH_ENV; a test keeps
them equal): user code and handle routers on the replica's loop, gRPC between deployments. */}}
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: "0"
- name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP
  value: "0"
- name: RAY_SERVE_USE_GRPC_BY_DEFAULT
  value: "1"
- name: RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE
  value: "1000"
{{- if .Values.huggingFace.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.huggingFace.tokenSecret }}
      key: token
{{- end }}
{{- end -}}

{{- define "serving.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
