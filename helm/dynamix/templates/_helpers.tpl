{{/* Names and labels */}}
{{- define "dynamix.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "dynamix.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dynamix.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image reference pinned by tag; `latest` or an empty tag fails the render. */}}
{{- define "dynamix.image" -}}
{{- if or (not .tag) (eq (toString .tag) "latest") -}}
{{- fail (printf "image %s: pin a version tag (got %q); `latest` is not allowed" .repository (toString .tag)) -}}
{{- end -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{- define "dynamix.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow:%d" (include "dynamix.fullname" .) (int .Values.mlflow.port) -}}
{{- else -}}
{{- required "mlflow.externalTrackingUri is required when mlflow.enabled=false" .Values.mlflow.externalTrackingUri -}}
{{- end -}}
{{- end -}}

{{/* Container hardening shared by every container. */}}
{{- define "dynamix.containerSecurity" -}}
securityContext:
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{/*
storage.uri, checked: an object-store URI, or a path under storage.mountPath with a PVC mounted there
(the Ray pods share nothing else: their root file system is read-only, /tmp is per pod).
*/}}
{{- define "dynamix.storageUri" -}}
{{- $uri := required "storage.uri is required (s3://bucket/prefix, gs://bucket/prefix, or a path on storage.pvcName)" .Values.storage.uri | trimSuffix "/" -}}
{{- if not (contains "://" $uri) -}}
{{- if not .Values.storage.pvcName -}}
{{- fail (printf "storage.uri %s is a path: set storage.pvcName (a PVC mounted at storage.mountPath on every Ray pod) or use an object-store URI" $uri) -}}
{{- end -}}
{{- $mount := trimSuffix "/" .Values.storage.mountPath -}}
{{- if not (or (eq $uri $mount) (hasPrefix (printf "%s/" $mount) $uri)) -}}
{{- fail (printf "storage.uri %s is not under storage.mountPath %s, where storage.pvcName is mounted" $uri .Values.storage.mountPath) -}}
{{- end -}}
{{- end -}}
{{- $uri -}}
{{- end -}}

{{/*
Object-store settings shared by the Ray containers and the MLflow server: region and endpoint as
plain values, static keys only from storage.credentialsSecret (none with cloud identity).
Call with (dict "root" $ "endpointVar" "AWS_ENDPOINT_URL").
*/}}
{{- define "dynamix.objectStoreEnv" -}}
{{- $s := .root.Values.storage -}}
{{- with $s.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $s.endpointUrl }}
- name: {{ $.endpointVar }}
  value: {{ . | quote }}
{{- end }}
{{- if $s.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ $s.credentialsSecret }}, key: AWS_ACCESS_KEY_ID}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ $s.credentialsSecret }}, key: AWS_SECRET_ACCESS_KEY}}
{{- if not $s.endpointUrl }}
- name: {{ .endpointVar }}
  valueFrom: {secretKeyRef: {name: {{ $s.credentialsSecret }}, key: AWS_ENDPOINT_URL, optional: true}}
{{- end }}
{{- end }}
{{- end -}}

{{/* Environment of every Ray container: tracking URI, storage root, object-store settings. */}}
{{- define "dynamix.rayEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "dynamix.trackingUri" . | quote }}
- name: DYNAMIX_STORAGE_URI
  value: {{ include "dynamix.storageUri" . | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: HOME
  value: /tmp
{{- include "dynamix.objectStoreEnv" (dict "root" . "endpointVar" "AWS_ENDPOINT_URL") }}
{{- end -}}

{{- define "dynamix.rayVolumes" -}}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir: {medium: Memory, sizeLimit: {{ .Values.gpuWorkers.shmSize }}}
{{- if .Values.storage.pvcName }}
- name: shared
  persistentVolumeClaim: {claimName: {{ .Values.storage.pvcName }}}
{{- end }}
{{- end -}}

{{- define "dynamix.rayMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: dshm, mountPath: /dev/shm}
{{- if .Values.storage.pvcName }}
- {name: shared, mountPath: {{ .Values.storage.mountPath }}}
{{- end }}
{{- end -}}

{{/*
The RayCluster spec shared by the training RayJob, the retraining RayJob template, the RayCronJob
and the standing RayCluster. Call with (dict "root" $ "workers" <worker values>).
*/}}
{{- define "dynamix.rayClusterSpec" -}}
{{- $ := .root -}}
rayVersion: {{ $.Values.rayVersion | quote }}
{{- if $.Values.ray.auth.enabled }}
authOptions:
  mode: token
  secretName: {{ $.Values.ray.auth.secretName }}
{{- end }}
headGroupSpec:
  rayStartParams:
    num-cpus: "0"
    dashboard-host: "0.0.0.0"
  template:
    metadata:
      labels:
        {{- include "dynamix.labels" $ | nindent 8 }}
        app.kubernetes.io/component: ray-head
    spec:
      serviceAccountName: {{ include "dynamix.fullname" $ }}-ray
      securityContext:
        {{- toYaml $.Values.podSecurityContext | nindent 8 }}
      {{- with $.Values.imagePullSecrets }}
      imagePullSecrets: {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ include "dynamix.image" $.Values.cpuImage }}
          {{- include "dynamix.containerSecurity" $ | nindent 10 }}
          ports:
            - {containerPort: 6379, name: gcs}
            - {containerPort: 8265, name: dashboard}
            - {containerPort: 10001, name: client}
          env:
            {{- include "dynamix.rayEnv" $ | nindent 12 }}
          resources:
            {{- toYaml $.Values.head.resources | nindent 12 }}
          volumeMounts:
            {{- include "dynamix.rayMounts" $ | nindent 12 }}
      volumes:
        {{- include "dynamix.rayVolumes" $ | nindent 8 }}
workerGroupSpecs:
  - groupName: gpu
    replicas: {{ .workers.replicas }}
    minReplicas: {{ .workers.minReplicas }}
    maxReplicas: {{ .workers.maxReplicas }}
    rayStartParams: {}
    template:
      metadata:
        labels:
          {{- include "dynamix.labels" $ | nindent 10 }}
          app.kubernetes.io/component: ray-worker
      spec:
        serviceAccountName: {{ include "dynamix.fullname" $ }}-ray
        securityContext:
          {{- toYaml $.Values.podSecurityContext | nindent 10 }}
        {{- with $.Values.gpuWorkers.nodeSelector }}
        nodeSelector: {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $.Values.gpuWorkers.tolerations }}
        tolerations: {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $.Values.imagePullSecrets }}
        imagePullSecrets: {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ include "dynamix.image" $.Values.image }}
            {{- include "dynamix.containerSecurity" $ | nindent 12 }}
            env:
              {{- include "dynamix.rayEnv" $ | nindent 14 }}
            resources:
              requests:
                {{- toYaml $.Values.gpuWorkers.resources.requests | nindent 16 }}
                nvidia.com/gpu: {{ $.Values.gpuWorkers.gpusPerWorker }}
              limits:
                {{- toYaml $.Values.gpuWorkers.resources.limits | nindent 16 }}
                nvidia.com/gpu: {{ $.Values.gpuWorkers.gpusPerWorker }}
            volumeMounts:
              {{- include "dynamix.rayMounts" $ | nindent 14 }}
        volumes:
          {{- include "dynamix.rayVolumes" $ | nindent 10 }}
{{- end -}}

{{/*
The RayJob spec of a training (or retraining) run. Call with (dict "root" $ "entrypoint" "..." "workers" <values>):
workers may set replicas / minReplicas / maxReplicas; the rest comes from gpuWorkers.
*/}}
{{- define "dynamix.rayJobSpec" -}}
{{- $ := .root -}}
{{- $workers := merge (deepCopy (.workers | default dict)) (deepCopy $.Values.gpuWorkers) -}}
entrypoint: {{ .entrypoint | quote }}
shutdownAfterJobFinishes: true
ttlSecondsAfterFinished: {{ $.Values.train.ttlSecondsAfterFinished }}
activeDeadlineSeconds: {{ $.Values.train.activeDeadlineSeconds }}
backoffLimit: {{ $.Values.train.backoffLimit }}
submissionMode: K8sJobMode
runtimeEnvYAML: |
  env_vars:
    MLFLOW_TRACKING_URI: {{ include "dynamix.trackingUri" $ | quote }}
    DYNAMIX_STORAGE_URI: {{ include "dynamix.storageUri" $ | quote }}
submitterPodTemplate:
  metadata:
    labels:
      {{- include "dynamix.labels" $ | nindent 6 }}
      app.kubernetes.io/component: ray-job-submitter
  spec:
    restartPolicy: Never
    securityContext:
      {{- toYaml $.Values.podSecurityContext | nindent 6 }}
    containers:
      - name: ray-job-submitter
        image: {{ include "dynamix.image" $.Values.cpuImage }}
        {{- include "dynamix.containerSecurity" $ | nindent 8 }}
        env:
          - {name: HOME, value: /tmp}
        resources:
          requests: {cpu: 100m, memory: 256Mi}
          limits: {cpu: 500m, memory: 1Gi}
        volumeMounts:
          - {name: tmp, mountPath: /tmp}
    volumes:
      - name: tmp
        emptyDir: {}
rayClusterSpec:
  {{- include "dynamix.rayClusterSpec" (dict "root" $ "workers" $workers) | nindent 2 }}
{{- end -}}

{{- define "dynamix.trainEntrypoint" -}}
dynamix train --config {{ .Values.train.recipe }} --run-name {{ .Values.train.runName }} --storage {{ include "dynamix.storageUri" . }}/runs{{ with .Values.train.registeredModel }} --set tracking.registered_model={{ . }}{{ end }}{{ range .Values.train.overrides }} --set {{ . | squote }}{{ end }}
{{- end -}}

{{- define "dynamix.retrainEntrypoint" -}}
dynamix retrain --config {{ .Values.retrain.config }} --storage {{ include "dynamix.storageUri" . }}
{{- end -}}
