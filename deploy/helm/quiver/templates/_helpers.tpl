{{- define "quiver.labels" -}}
app.kubernetes.io/name: quiver
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "quiver.claim" -}}
{{- if .Values.adapters.existingClaim -}}{{ .Values.adapters.existingClaim }}{{- else -}}{{ .Release.Name }}-adapters{{- end -}}
{{- end -}}

{{- define "quiver.secret" -}}{{ .Release.Name }}-secrets{{- end -}}

{{/* The settings every Quiver process (gateway, training Job) reads. */}}
{{- define "quiver.env" -}}
- name: QUIVER_STORE_DIR
  value: {{ .Values.adapters.mountPath | quote }}
- name: QUIVER_DATA_DIR
  value: /data
- name: QUIVER_BASE_MODEL
  value: {{ .Values.model.servedName | quote }}
- name: QUIVER_MAX_LORAS
  value: {{ .Values.vllm.maxLoras | quote }}
- name: QUIVER_MAX_LORA_RANK
  value: {{ .Values.vllm.maxLoraRank | quote }}
- name: QUIVER_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret | default (include "quiver.secret" .) }}
      key: QUIVER_DATABASE_URL
{{- if .Values.redis.url }}
- name: QUIVER_REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- end }}
{{- if or .Values.adminKey.value .Values.adminKey.existingSecret }}
- name: QUIVER_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.adminKey.existingSecret | default (include "quiver.secret" .) }}
      key: QUIVER_ADMIN_KEY
{{- end }}
{{- end -}}

{{- define "quiver.vllmEnv" -}}
- name: VLLM_ALLOW_RUNTIME_LORA_UPDATING
  value: "True"
{{- end -}}

{{/* Every vLLM replica's URL, comma-separated: the gateway places adapters on them with affinity. */}}
{{- define "quiver.vllmUrls" -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.vllm.replicas) -}}
{{- $urls = append $urls (printf "http://%s-vllm-%d.%s-vllm:%v" $.Release.Name $i $.Release.Name $.Values.vllm.port) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}
