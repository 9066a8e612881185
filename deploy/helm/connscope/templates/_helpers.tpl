{{- define "connscope.labels" -}}
app.kubernetes.io/name: connscope
{{- end -}}
