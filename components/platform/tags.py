"""Every ``stemma.*`` tag, event and metadata key Stemma writes, in one place.

The strings are stored in existing tracking servers: never change one, add a new name.
A name ending in ``_PREFIX`` is followed by a field name (``GATE_PREFIX + "decision"``).

A run carries at most :data:`MAX_TAGS` of Stemma's tags, the ones :data:`RUN_TAGS` lists
for its flow: what users filter on in MLflow's search box and what Stemma's own searches
need. Everything else a run knows (paths, spec, checks, reasons, drift details, the
evidence of a promotion) is in its lineage record (``lineage/record.json``, node
attributes and ``decision``), its description, or its params (the spec file and the
overrides of a training run). Names a run no longer carries are still defined here,
marked "read from older stores": readers fall back to them.

=========  ===============================================================================
every run  pipeline, flow, status, error (on failure), prefect.flow_run_id,
           lineage.made-nodes, lineage.used-nodes (continued in ``.2``, ... when huge)
train      data.md5, data.file_md5, git.rev, weights.sha256, gate.decision
score      model.version, input.digest, output.sha256, score.key, score.owner,
           score.resumes (after a resume)
monitor    model.version, input.digest, drift.detected, drift.event_id,
           drift.event_emitted ("false" when sending failed)
shadow     model.champion, model.challenger, input.digest, output.sha256, shadow.decision
canary     canary.step_key, canary.control, canary.challenger, canary.decision,
           input.digest, output.sha256
retrain    cause.kind, data.md5, model.version, retrain.outcome, shadow.decision
quantize   model.version, data.md5, quantize.registered
compress   model.version, data.md5
compare    model.version, data.md5
promote    flow, status, lineage tags, promotion.model, .action, .from_version,
           .to_version, .outcome, .generation, .flow_run_id, .detail (not done)
=========  ===============================================================================

A model version carries at most :data:`MAX_TAGS` too, the ones :data:`VERSION_TAGS` lists
for its kind: the integrity tags a load checks, the gate's verdict the registry text shows,
and the links a reader needs. The rest is read from the version's run (``version.run_id``,
an MLflow field): a trained version's run holds its data file, checks and commit in its
lineage record and the gate's whole decision in ``gate/decision.json``; that run's parent,
when a retraining started it, holds the cause; a variant's run (the quantize run) holds
each method's numbers and reasons in its record.

=========  ===============================================================================
trained    data.md5, weights.sha256, model.files, runtime.backend, onnx.sha256 (ONNX
           Runtime) or runtime.reason (eager), architecture.sha256 (custom network),
           profile.sha256, gate.decision, gate.metric, gate.value, promotion.last (once a
           promotion involved it), quantize.summary (once quantized)
variant    data.md5, weights.sha256, model.files, runtime.backend, onnx.sha256 or
           runtime.reason, architecture.sha256 (custom network), quantize.method,
           .parent_version, .parent_weights_sha256, .status, .owner (while registering)
=========  ===============================================================================

A logged model (not counted above) carries the integrity tags its version copies, its
task and, when it carries its project's module in ``code/``, architecture.code_sha256.
"""

# --- Every run -----------------------------------------------------------------------
PIPELINE = "stemma.pipeline"  # run: the pipeline's name from the spec
FLOW = "stemma.flow"  # run: which flow made it ("train", "score", ...)
STATUS = "stemma.status"  # run: running / completed / failed / interrupted / killed
ERROR = "stemma.error"  # run: headline of the error that ended it
TASK = "stemma.task"  # logged model: the model's task (classification, regression)
RUN_ID = "stemma.run_id"  # read from older stores: a version's run (now version.run_id)
PREFECT_FLOW_RUN_ID = "stemma.prefect.flow_run_id"  # run: Prefect's id of the flow run
CONFIG_PATH = "stemma.config.path"  # read from older stores: the spec file (now a param)
CONFIG_SHA256 = "stemma.config.sha256"  # read from older stores: the spec's sha256
OVERRIDES = "stemma.overrides"  # read from older stores: the overrides (now a param)
GIT_REV = "stemma.git.rev"  # train run: the code's git commit (older stores: versions too)
GIT_DIRTY = "stemma.git.dirty"  # read from older stores: "true" when the tree had changes

# --- Data ----------------------------------------------------------------------------
DATA_POINTER = "stemma.data.pointer"  # run: the DVC pointer file of the training data
DATA_PATH = "stemma.data.path"  # run: the training data file
DATA_MD5 = "stemma.data.md5"  # run, version: md5 of the data version trained on
DATA_FILE_MD5 = "stemma.data.file_md5"  # train run (older stores: version): the file's md5
DATA_PREVIOUS_MD5 = "stemma.data.previous_md5"  # retrain run: the data version replaced
DATA_GIT_REV = "stemma.data.git_rev"  # retrain run: the commit holding the new pointer
DATA_SOURCES = "stemma.data.sources"  # retrain run: the files merged, as JSON
CHECKS_DIGEST = "stemma.checks.digest"  # read from older stores: the checks' report digest
CHECKS_SUCCESS = "stemma.checks.success"  # run: "true" when every data check passed
INPUT_PATH = "stemma.input.path"  # run: the batch scored or monitored
INPUT_DIGEST = "stemma.input.digest"  # run: digest of that batch
BATCH_PATH = "stemma.batch.path"  # older monitor runs: the batch (now INPUT_PATH)
BATCH_DIGEST = "stemma.batch.digest"  # older monitor runs: now INPUT_DIGEST
LABELS_PATH = "stemma.labels.path"  # monitor run: the labels file
LABELS_DIGEST = "stemma.labels.digest"  # monitor run: digest of the labels file
OUTPUT_PATH = "stemma.output.path"  # score run: the output folder
OUTPUT_SHA256 = "stemma.output.sha256"  # run: sha256 of the output's manifest
PROFILE_SHA256 = "stemma.profile.sha256"  # run: sha256 of the reference data profile

# --- Model identity and integrity ----------------------------------------------------
# The weights hash is spelled two ways and both stay: runs and model versions carry
# WEIGHTS_SHA256 ("stemma.weights.sha256"); logged models carry LOGGED_MODEL_WEIGHTS_SHA256
# ("stemma.weights_sha256"), which a registered version copies under WEIGHTS_SHA256.
WEIGHTS_SHA256 = "stemma.weights.sha256"  # run, model version: sha256 of the weights
LOGGED_MODEL_WEIGHTS_SHA256 = "stemma.weights_sha256"  # logged model: the same hash
MODEL_FILES = "stemma.model.files"  # logged model, version: {path: sha256} of its files
ARCHITECTURE_SHA256 = "stemma.architecture.sha256"  # sha256 of a custom network's source
# logged model: digest of the project code it carries in code/ (sha256 of its sorted
# `<sha256>  <path>` lines; each file's sha256 is in MODEL_FILES and the run's record)
ARCHITECTURE_CODE_SHA256 = "stemma.architecture.code_sha256"
MODEL_URI = "stemma.model.uri"  # run: the model's MLflow URI
MODEL_VERSION = "stemma.model.version"  # run: the registered version used or made
MODEL_REFERENCE = "stemma.model.reference"  # run: the reference as the user wrote it
MODEL_CHAMPION = "stemma.model.champion"  # shadow run: the champion's version
MODEL_CHALLENGER = "stemma.model.challenger"  # shadow run: the challenger's version
ONNX_SHA256 = "stemma.onnx.sha256"  # logged model, version: sha256 of network.onnx
RUNTIME_BACKEND = "stemma.runtime.backend"  # logged model, version: onnxruntime or eager
RUNTIME_REASON = "stemma.runtime.reason"  # logged model, version: why eager was chosen

# --- Gate, promotion and claims ------------------------------------------------------
# A version carries the gate's verdict, metric and value; the whole decision is the training
# run's gate/decision.json. Older stores hold every field as a GATE_PREFIX tag (alias,
# minimum, maximum, margin, champion_version, champion_value, reasons, ignored_champion).
GATE_PREFIX = "stemma.gate."  # version: the gate's decision fields (see above)
GATE_DECISION = "stemma.gate.decision"  # version: "passed" or "failed"
GATE_METRIC = "stemma.gate.metric"  # version: the metric the gate read
GATE_VALUE = "stemma.gate.value"  # version: that metric's value
PROMOTION_PREFIX = "stemma.promotion."  # promote run: one tag per field of the record
PROMOTION_LAST = "stemma.promotion.last"  # version: JSON of its latest promotion decision
PROMOTION_GENERATION = "stemma.promotion.generation"  # model: champion moves made so far
PROMOTION_CHAMPION = "stemma.promotion.champion"  # model: the version Stemma made champion
PROMOTION_EVIDENCE = "stemma.promotion.evidence"  # promote run: the evidence, as JSON
PROMOTION_OUTCOME = "stemma.promotion.outcome"  # shadow run: what promotion did
CLAIMS_EXPERIMENT_PREFIX = "stemma.claims"  # experiment names that claim a generation
CLAIM_PREFIX = "stemma.claim."  # claim experiment: holder, heartbeat and action fields

# --- Quantization --------------------------------------------------------------------
QUANTIZE_PREFIX = "stemma.quantize."  # variant version: method, parent, status, ...
QUANTIZE_METHOD = "stemma.quantize.method"  # variant tag and safetensors metadata key
QUANTIZE_REGISTERED = "stemma.quantize.registered"  # quantize run: variants registered
QUANTIZE_PARENT_VERSION = "stemma.quantize.parent_version"  # variant: its fp32 version
QUANTIZE_PARENT_WEIGHTS_SHA256 = "stemma.quantize.parent_weights_sha256"  # variant: parent's
QUANTIZE_STATUS = "stemma.quantize.status"  # variant: registering, then registered
QUANTIZE_OWNER = "stemma.quantize.owner"  # variant: host:pid registering it, until done
QUANTIZE_SUMMARY = "stemma.quantize.summary"  # parent version: latest decision per method
# Variants of older stores also carry quantize.runtime, .decision, .reasons, .metric,
# .metric_drop, .speedup, .latency_ms and .baseline: now the quantize run's record.

# --- Scoring, shadow and canary ------------------------------------------------------
SCORE_KEY = "stemma.score.key"  # score run: what it scores, to find a run to resume
SCORE_OWNER = "stemma.score.owner"  # score run: host:pid of the scoring process
SCORE_RESUMES = "stemma.score.resumes"  # score run: times it was resumed
SCORE_RUNNER = "stemma.score.runner"  # score run: the runner (local, dask)
SHADOW_RUN_ID = "stemma.shadow.run_id"  # read from older stores: a version's shadow run
SHADOW_DECISION = "stemma.shadow.decision"  # run (older stores: version): shadow verdict
SHADOW_REASONS = "stemma.shadow.reasons"  # shadow run: why, joined by " | "
SHADOW_OUTPUT_SHA256 = "stemma.shadow.output.sha256"  # shadow run: challenger output hash
SHADOW_BATCH = "stemma.shadow.batch"  # retrain run: the holdout batch shadowed
CANARY_STATE = "stemma.canary.state"  # registered model: the canary's state as JSON
CANARY_STEP_KEY = "stemma.canary.step_key"  # canary run: the step, so a resume reuses it
CANARY_PHASE = "stemma.canary.phase"  # canary run: the phase
CANARY_STEP = "stemma.canary.step"  # canary run: the step number
CANARY_FRACTION = "stemma.canary.fraction"  # canary run: traffic share of the challenger
CANARY_CONTROL = "stemma.canary.control"  # canary run: the control version
CANARY_CHALLENGER = "stemma.canary.challenger"  # canary run: the challenger version
CANARY_DECISION = "stemma.canary.decision"  # canary run: the step's decision
CANARY_ACTION = "stemma.canary.action"  # canary run: the action applied
CANARY_OUTCOME = "stemma.canary.outcome"  # canary run: the outcome of that action
CANARY_STATUS = "stemma.canary.status"  # canary run: the canary's status afterwards
CONTROL_MODEL_URI = "stemma.control_model_uri"  # canary output metadata: the control
CHALLENGER_MODEL_URI = "stemma.challenger_model_uri"  # canary output metadata

# --- Monitoring and retraining -------------------------------------------------------
DRIFT_DETECTED = "stemma.drift.detected"  # monitor run tag, and the drift event's name
DRIFT_FEATURES = "stemma.drift.features"  # monitor run: the drifted features
DRIFT_KINDS = "stemma.drift.kinds"  # monitor run: the kinds of drift found
DRIFT_SUMMARY = "stemma.drift.summary"  # monitor run: a one-line summary
DRIFT_EVENT_ID = "stemma.drift.event_id"  # monitor run: id of the event emitted
DRIFT_EVENT_EMITTED = "stemma.drift.event_emitted"  # monitor run: "false" if sending failed
RETRAIN_RUN_ID = "stemma.retrain.run_id"  # read from older stores: a version's retraining
RETRAIN_OUTCOME = "stemma.retrain.outcome"  # retrain run: what the retraining ended in
TRAIN_RUN_ID = "stemma.train.run_id"  # retrain run: the training run it started
CAUSE_PREFIX = "stemma.cause."  # retrain run (older stores: version): why, one tag a field
CAUSE_KIND = "stemma.cause.kind"  # retrain run: the kind of cause (drift, schedule, ...)
CAUSE_RUN_ID = "stemma.cause.run_id"  # retrain run: the run (drift report) that caused it

# --- Lineage index -------------------------------------------------------------------
# Two tags per run (platform/lineage.py), continued in `<tag>.2`, ... for huge records.
LINEAGE_MADE_NODES = "stemma.lineage.made-nodes"  # run: |kind:key| of each node produced
LINEAGE_USED_NODES = "stemma.lineage.used-nodes"  # run: |kind:key| of each node read
# Written by older Stemma versions (one tag per node), still read:
LINEAGE_SCHEMA = "stemma.lineage.schema"  # run: record layout; present when indexed
LINEAGE_EDGES = "stemma.lineage.edges"  # run: the record's edges as JSON
LINEAGE_MADE_PREFIX = "stemma.lineage.made."  # run: one tag per node it produced
LINEAGE_USED_PREFIX = "stemma.lineage.used."  # run: one tag per node it read
LINEAGE_MADE_KIND_PREFIX = "stemma.lineage.made-kind."  # run: kinds of node produced
LINEAGE_USED_KIND_PREFIX = "stemma.lineage.used-kind."  # run: kinds of node read

# --- Events and file metadata --------------------------------------------------------
LINEAGE_RECORD_LAYOUT = "stemma.lineage/1"  # lineage/record.json: its "schema" value
BATCH_SCORED_EVENT = "stemma.batch.scored"  # Prefect event after a batch is scored
PARQUET_METADATA_PREFIX = "stemma."  # key prefix of Stemma's Parquet file metadata


# --- The tags each run carries -------------------------------------------------------
#: Most of Stemma's tags on one run or model version (``mlflow.*`` not counted).
MAX_TAGS = 12
#: Every run's tags (ERROR only on failure). Index tags continue in ``<tag>.2``, ...
COMMON_RUN_TAGS = (
    PIPELINE,
    FLOW,
    STATUS,
    ERROR,
    PREFECT_FLOW_RUN_ID,
    LINEAGE_MADE_NODES,
    LINEAGE_USED_NODES,
)
#: Fields of a promotion decision its run carries as ``PROMOTION_PREFIX + field`` tags:
#: what a search filters on (who, when, the reason and the evidence are in its record).
PROMOTION_RUN_FIELDS = (
    "model",
    "action",
    "from_version",
    "to_version",
    "outcome",
    "generation",
    "flow_run_id",
    "detail",
)
#: The documented tags of each flow's runs, besides COMMON_RUN_TAGS. Runs of this version
#: no longer carry DATA_POINTER, DATA_PATH, CHECKS_*, CONFIG_*, OVERRIDES, GIT_DIRTY,
#: INPUT_PATH, LABELS_*, OUTPUT_PATH, MODEL_URI, MODEL_REFERENCE, SCORE_RUNNER,
#: RUNTIME_BACKEND (on runs), DRIFT_FEATURES/KINDS/SUMMARY, SHADOW_REASONS,
#: SHADOW_OUTPUT_SHA256, SHADOW_RUN_ID, SHADOW_BATCH, TRAIN_RUN_ID, DATA_PREVIOUS_MD5,
#: DATA_GIT_REV, DATA_SOURCES, CANARY_PHASE/STEP/FRACTION/ACTION/OUTCOME/STATUS,
#: PROMOTION_OUTCOME (on shadow runs), PROMOTION_EVIDENCE and the promotion's who, when,
#: reason and took_over: those names are read from older stores only.
RUN_TAGS: dict[str, tuple[str, ...]] = {
    "train": (DATA_MD5, DATA_FILE_MD5, GIT_REV, WEIGHTS_SHA256, GATE_DECISION),
    "score": (MODEL_VERSION, INPUT_DIGEST, OUTPUT_SHA256, SCORE_KEY, SCORE_OWNER, SCORE_RESUMES),
    "monitor": (MODEL_VERSION, INPUT_DIGEST, DRIFT_DETECTED, DRIFT_EVENT_ID, DRIFT_EVENT_EMITTED),
    "shadow": (MODEL_CHAMPION, MODEL_CHALLENGER, INPUT_DIGEST, OUTPUT_SHA256, SHADOW_DECISION),
    "canary": (
        CANARY_STEP_KEY,
        CANARY_CONTROL,
        CANARY_CHALLENGER,
        CANARY_DECISION,
        INPUT_DIGEST,
        OUTPUT_SHA256,
    ),
    "retrain": (
        CAUSE_KIND,
        CAUSE_RUN_ID,
        DATA_MD5,
        MODEL_VERSION,
        RETRAIN_OUTCOME,
        SHADOW_DECISION,
    ),
    "quantize": (MODEL_VERSION, DATA_MD5, QUANTIZE_REGISTERED),
    "compress": (MODEL_VERSION, DATA_MD5),
    "compare": (MODEL_VERSION, DATA_MD5),
    "promote": tuple(PROMOTION_PREFIX + field for field in PROMOTION_RUN_FIELDS),
}

# --- The tags each model version carries ---------------------------------------------
#: What every version carries: its data, what a load checks, and the backend serving it.
VERSION_IDENTITY_TAGS = (
    DATA_MD5,
    WEIGHTS_SHA256,
    MODEL_FILES,
    RUNTIME_BACKEND,
    ONNX_SHA256,
    RUNTIME_REASON,
    ARCHITECTURE_SHA256,
)
#: The documented tags of each kind of model version (at most MAX_TAGS on one: ONNX_SHA256
#: and RUNTIME_REASON exclude each other). "trained": what the training flow registers,
#: gate passed or failed, champion, challenger or retrained; "variant": a quantized variant.
#: Versions of this version no longer carry RUN_ID, DATA_FILE_MD5, CHECKS_DIGEST, GIT_REV,
#: the gate's fields beyond its verdict, metric and value, SHADOW_DECISION, SHADOW_RUN_ID,
#: RETRAIN_RUN_ID, CAUSE_PREFIX fields, nor a variant's numbers: read from older stores.
VERSION_TAGS: dict[str, tuple[str, ...]] = {
    "trained": (
        *VERSION_IDENTITY_TAGS,
        PROFILE_SHA256,
        GATE_DECISION,
        GATE_METRIC,
        GATE_VALUE,
        PROMOTION_LAST,
        QUANTIZE_SUMMARY,
    ),
    "variant": (
        *VERSION_IDENTITY_TAGS,
        QUANTIZE_METHOD,
        QUANTIZE_PARENT_VERSION,
        QUANTIZE_PARENT_WEIGHTS_SHA256,
        QUANTIZE_STATUS,
        QUANTIZE_OWNER,
    ),
}
