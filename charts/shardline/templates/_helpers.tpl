{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "shardline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource-name prefix, at most 40 characters so that <fullname>-worker-K-R fits a DNS label. */}}
{{- define "shardline.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shardline.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: call with (dict "root" $ "component" "scheduler"). */}}
{{- define "shardline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardline.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shardline.labels" -}}
helm.sh/chart: {{ include "shardline.chart" .root }}
{{ include "shardline.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: shardline
{{- end -}}

{{/* Selector labels of the worker pods of stage .stage. */}}
{{- define "shardline.workerSelectorLabels" -}}
{{ include "shardline.selectorLabels" (dict "root" .root "component" "worker") }}
shardline.io/stage: {{ .stage | quote }}
{{- end -}}

{{- define "shardline.workerName" -}}
{{- printf "%s-worker-%d" (include "shardline.fullname" .root) (int .stage) -}}
{{- end -}}

{{- define "shardline.schedulerServiceAccountName" -}}
{{- if .Values.scheduler.serviceAccount.create -}}
{{- default (printf "%s-scheduler" (include "shardline.fullname" .)) .Values.scheduler.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.scheduler.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Addresses ---------------------------------------------------------------------------- */}}

{{/* Stable DNS address of stage .stage, replica .replica (the StatefulSet pod's own name). */}}
{{- define "shardline.workerAddress" -}}
{{- $name := include "shardline.workerName" . -}}
{{- printf "%s-%d.%s.%s.svc.%s:%d" $name (int .replica) $name .root.Release.Namespace .root.Values.clusterDomain (int .root.Values.worker.port) -}}
{{- end -}}

{{- define "shardline.tokenizerAddress" -}}
{{- printf "%s-tokenizer.%s.svc.%s:%d" (include "shardline.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.tokenizer.port) -}}
{{- end -}}

{{/* "external" (redis.url or redis.urlSecret), "internal" (in-chart StatefulSet) or "none". */}}
{{- define "shardline.redisMode" -}}
{{- if or .Values.redis.url .Values.redis.urlSecret.name -}}external
{{- else if .Values.redis.enabled -}}internal
{{- else -}}none
{{- end -}}
{{- end -}}

{{/* Value of --redis-url; $(SHARDLINE_REDIS_URL) is expanded by the kubelet from the Secret. */}}
{{- define "shardline.redisURL" -}}
{{- if .Values.redis.urlSecret.name -}}
$(SHARDLINE_REDIS_URL)
{{- else if .Values.redis.url -}}
{{- .Values.redis.url -}}
{{- else -}}
{{- printf "redis://%s-redis.%s.svc.%s:%d/0" (include "shardline.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.redis.port) -}}
{{- end -}}
{{- end -}}

{{/* Model ---------------------------------------------------------------------------------- */}}

{{/* Value of --model for the tokenizer and workers. */}}
{{- define "shardline.modelArg" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "hub" -}}
{{- $m.hub.id -}}
{{- else if and (eq $m.source "pvc") $m.pvc.subPath -}}
{{- printf "%s/%s" (trimSuffix "/" $m.mountPath) (trimPrefix "/" $m.pvc.subPath) -}}
{{- else if or (eq $m.source "pvc") (eq $m.source "hostPath") -}}
{{- $m.mountPath -}}
{{- else -}}
smollm2-135m-instruct
{{- end -}}
{{- end -}}

{{/* Value of the scheduler's --model (the name GetModelInfo reports). */}}
{{- define "shardline.servedName" -}}
{{- $m := .Values.model -}}
{{- if $m.servedName -}}
{{- $m.servedName -}}
{{- else if eq $m.source "pvc" -}}
{{- base (default $m.pvc.claimName $m.pvc.subPath) -}}
{{- else if eq $m.source "hostPath" -}}
{{- base $m.hostPath.path -}}
{{- else -}}
{{- include "shardline.modelArg" . -}}
{{- end -}}
{{- end -}}

{{/* Worker settings ---------------------------------------------------------------------- */}}

{{- define "shardline.workerDevice" -}}
{{- if eq .Values.worker.device "auto" -}}
{{- ternary "cuda" "cpu" .Values.worker.gpu.enabled -}}
{{- else -}}
{{- .Values.worker.device -}}
{{- end -}}
{{- end -}}

{{/* --threads: worker.threads, else the whole-CPU part of the CPU limit (at least 1), else 0. */}}
{{- define "shardline.workerThreads" -}}
{{- $t := int .Values.worker.threads -}}
{{- $limits := .Values.worker.resources.limits | default dict -}}
{{- if and (eq $t 0) (hasKey $limits "cpu") -}}
{{- $cpu := toString (get $limits "cpu") -}}
{{- if hasSuffix "m" $cpu -}}
{{- $t = div (atoi (trimSuffix "m" $cpu)) 1000 -}}
{{- else -}}
{{- $t = int (floor (float64 $cpu)) -}}
{{- end -}}
{{- $t = max $t 1 -}}
{{- end -}}
{{- $t -}}
{{- end -}}

{{/* Worker resources, with the GPUs added when worker.gpu.enabled: worker.gpu.count, at least
one per tensor-parallel rank. */}}
{{- define "shardline.workerResources" -}}
{{- $res := deepCopy .Values.worker.resources -}}
{{- if .Values.worker.gpu.enabled -}}
{{- $limits := $res.limits | default dict -}}
{{- $gpus := max (int .Values.worker.gpu.count) (int (.Values.pipeline.tensorParallel | default 1)) -}}
{{- $_ := set $limits "nvidia.com/gpu" (int $gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Pod pieces shared by every Shardline service ----------------------------------------- */}}

{{- define "shardline.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Pod Security Standard "restricted" at pod level; call with (dict "user" U "group" G "fsGroup" F). */}}
{{- define "shardline.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .user }}
runAsGroup: {{ .group }}
fsGroup: {{ .fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Pod Security Standard "restricted" at container level; call with the root context. */}}
{{- define "shardline.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ .Values.securityContext.readOnlyRootFilesystem }}
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container ports: the gRPC port, plus metrics; call with (dict "root" $ "port" P). */}}
{{- define "shardline.ports" -}}
- name: grpc
  containerPort: {{ .port }}
  protocol: TCP
{{- if .root.Values.metrics.enabled }}
- name: metrics
  containerPort: {{ .root.Values.metrics.port }}
  protocol: TCP
{{- end }}
{{- end -}}

{{/* Fail rendering unless pipeline.tensorParallel (T) splits the model's heads as the worker
     requires (models/parallel.py: check_tensor_parallel): T divides model.attentionHeads, and
     model.kvHeads divides by T or divides T. The chart cannot read the model: the heads are
     values (the default model's by default). */}}
{{- define "shardline.checkTensorParallel" -}}
{{- $t := int (.Values.pipeline.tensorParallel | default 1) -}}
{{- $h := int .Values.model.attentionHeads -}}
{{- $kv := int .Values.model.kvHeads -}}
{{- $problems := list -}}
{{- if mod $h $t -}}
{{- $problems = append $problems (printf "model.attentionHeads=%d is not divisible by %d" $h $t) -}}
{{- end -}}
{{- if and (mod $kv $t) (mod $t $kv) -}}
{{- $problems = append $problems (printf "model.kvHeads=%d neither divides by %d nor divides it" $kv $t) -}}
{{- end -}}
{{- if $problems -}}
{{- fail (printf "pipeline.tensorParallel=%d cannot split the model across its ranks: %s (set model.attentionHeads and model.kvHeads to your model's num_attention_heads and num_key_value_heads)" $t (join "; " $problems)) -}}
{{- end -}}
{{- end -}}

{{/* The ranks 1..T-1 of a tensor-parallel worker (pipeline.tensorParallel = T) that serve
     metrics of their own, on metrics.port + rank (worker/rank_group.py: rank_metrics_port), in
     ports named metrics-r<rank>: a list, empty without metrics.enabled or with T = 1. */}}
{{- define "shardline.metricsRanks" -}}
{{- if .Values.metrics.enabled -}}
{{- toJson (untilStep 1 (int (.Values.pipeline.tensorParallel | default 1)) 1) -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{/* Flags every Shardline service gets at the end of its command line. */}}
{{- define "shardline.commonArgs" -}}
- --log-level
- {{ .Values.logLevel }}
- --drain-timeout-s
- {{ .Values.drain.timeoutSeconds | quote }}
{{- if .Values.metrics.enabled }}
- --metrics-port
- {{ .Values.metrics.port | quote }}
{{- end }}
- --cluster-token-file
- /etc/shardline/cluster-token/token
{{- if .Values.tls.enabled }}
- --tls-cert
- /etc/shardline/tls/tls.crt
- --tls-key
- /etc/shardline/tls/tls.key
- --tls-ca
- /etc/shardline/tls/ca.crt
{{- with .Values.tls.serverName }}
- --tls-server-name
- {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The Secret holding the cluster token (key `token`). */}}
{{- define "shardline.clusterTokenSecret" -}}
{{- .Values.auth.clusterToken.existingSecret | default (printf "%s-cluster-token" (include "shardline.fullname" .)) -}}
{{- end -}}

{{/* The Secret holding the public API keys (key `keys`), or "" when none are configured. */}}
{{- define "shardline.apiKeysSecret" -}}
{{- if .Values.auth.apiKeys.existingSecret -}}
{{- .Values.auth.apiKeys.existingSecret -}}
{{- else if .Values.auth.apiKeys.keys -}}
{{- printf "%s-api-keys" (include "shardline.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Native gRPC startup, readiness and liveness probes on grpc.health.v1; (dict "root" $ "port" P).
       Under mTLS (which the kubelet's gRPC probe cannot speak) they are TCP probes instead;
       "public" ports (the scheduler's) keep gRPC, they serve plaintext. */}}
{{- define "shardline.probes" -}}
{{- $p := .root.Values.probes -}}
{{- $kind := ternary "tcpSocket" "grpc" (and .root.Values.tls.enabled (not .public)) -}}
startupProbe:
  {{ $kind }}:
    port: {{ .port }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ max 1 (div (add $p.startupSeconds $p.periodSeconds -1) $p.periodSeconds) }}
readinessProbe:
  {{ $kind }}:
    port: {{ .port }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: 2
livenessProbe:
  {{ $kind }}:
    port: {{ .port }}
  periodSeconds: {{ mul $p.periodSeconds 2 }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.livenessFailureThreshold }}
{{- end -}}

{{/* A Shardline pod's grace: the preStop sleep, then the drain, then a margin before SIGKILL. */}}
{{- define "shardline.terminationGracePeriodSeconds" -}}
{{- $d := .Values.drain -}}
{{- add $d.preStopSleepSeconds $d.timeoutSeconds $d.marginSeconds -}}
{{- end -}}

{{/* preStop sleep: endpoints and DNS forget the pod before SIGTERM starts the drain. */}}
{{- define "shardline.lifecycle" -}}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ .Values.drain.preStopSleepSeconds | quote }}]
{{- end -}}

{{/* Environment of a Shardline container; call with (dict "root" $ "component" C). */}}
{{- define "shardline.env" -}}
{{- $v := .root.Values -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- if $v.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $v.otel.protocol | quote }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_SERVICE_NAME
  value: shardline-{{ .component }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "service.namespace={{ .root.Release.Name }},k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME)"
{{- end }}
{{- if and (ne .component "scheduler") $v.model.hub.tokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.model.hub.tokenSecret.name }}
      key: {{ $v.model.hub.tokenSecret.key }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "shardline.envFrom" -}}
- configMapRef:
    name: {{ include "shardline.fullname" . }}
{{- end -}}

{{/* Scratch mounts (/tmp, $HOME) of every Shardline container. */}}
{{- define "shardline.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/shardline
- name: cluster-token
  mountPath: /etc/shardline/cluster-token
  readOnly: true
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/shardline/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "shardline.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.sizeLimit }}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.scratch.sizeLimit }}
- name: cluster-token
  secret:
    secretName: {{ include "shardline.clusterTokenSecret" . }}
    defaultMode: 0440
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.enabled needs tls.secretName (e.g. a cert-manager Certificate's secret)" .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* Cache and model mounts of the tokenizer and workers. */}}
{{- define "shardline.modelMounts" -}}
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
{{- if has .Values.model.source (list "pvc" "hostPath") }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Cache and model volumes; call with (dict "root" $ "claimTemplate" BOOL). With claimTemplate
     the cache volume comes from the StatefulSet's volumeClaimTemplates instead. */}}
{{- define "shardline.modelVolumes" -}}
{{- $v := .root.Values -}}
{{- if $v.cache.existingClaim }}
- name: cache
  persistentVolumeClaim:
    claimName: {{ $v.cache.existingClaim }}
{{- else if not .claimTemplate }}
- name: cache
  emptyDir:
    sizeLimit: {{ $v.cache.sizeLimit }}
{{- end }}
{{- if eq $v.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $v.model.pvc.claimName }}
    readOnly: true
{{- else if eq $v.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $v.model.hostPath.path }}
    type: Directory
{{- end }}
{{- end -}}

{{/* Pod-level scheduling of a component; call with the component's values. */}}
{{- define "shardline.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* NetworkPolicy pieces ----------------------------------------------------------------- */}}

{{/* Ingress rule letting metricsFrom scrape the metrics port, when metrics are on. */}}
{{- define "shardline.metricsIngress" -}}
{{- if .Values.metrics.enabled }}
- ports:
    - port: metrics
      protocol: TCP
  {{- with .Values.networkPolicy.metricsFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "shardline.schedulerPeer" -}}
- podSelector:
    matchLabels:
      {{- include "shardline.selectorLabels" (dict "root" . "component" "scheduler") | nindent 6 }}
{{- end -}}
