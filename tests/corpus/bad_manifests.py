"""The bad-manifest corpus: SpanTrainJobs that the API server and pydantic must judge alike.

Each case is a JSON merge patch (RFC 7386: objects merge, ``None`` deletes, anything else
replaces) on a valid base manifest (``examples/jobs/gpt-local.yaml``), the verdict both must
reach, and for a rejection the Kubernetes field path both messages must name (and, for a case
that breaks a CEL rule, that rule's message). Accepted cases must also plan: an accepted
manifest that the operator could not plan or turn into pods would hang.

Read by ``tests/unit/test_bad_manifests.py`` (pydantic, as ``spantrain local`` validates) and
``tests/kube_operator/test_bad_manifests.py`` (the real kube-apiserver, dry-run creation). Pure
data: imports PyYAML and the pure API module only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from spantrain_planner import api

BASE_PATH = Path(__file__).resolve().parents[2] / "examples" / "jobs" / "gpt-local.yaml"
BASE: dict[str, Any] = yaml.safe_load(BASE_PATH.read_text())

#: The message of the env-name rule on ``EnvVar`` (a plain CEL pair, not an ``api.Rule``).
RESERVED_ENV_MESSAGE = "env name is reserved"


@dataclass(frozen=True)
class Case:
    """One manifest of the corpus."""

    name: str
    patch: dict[str, Any]
    verdict: Literal["accept", "reject"]
    #: Kubernetes field path both messages name (rejections only), e.g. spec.training.steps
    field: str | None = None
    #: message of the CEL rule the case breaks (its pydantic mirror says the same)
    rule: str | None = None

    def manifest(self) -> dict[str, Any]:
        return merge_patch(BASE, self.patch)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (returns a new object)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def spec(**fields: Any) -> dict[str, Any]:
    return {"spec": fields}


def reject(name: str, patch: dict[str, Any], field: str, rule: api.Rule | str | None = None
           ) -> Case:
    message = rule.message if isinstance(rule, api.Rule) else rule
    return Case(name, patch, "reject", field, message)


def accept(name: str, patch: dict[str, Any]) -> Case:
    return Case(name, patch, "accept")


def _requests(**q: Any) -> dict[str, Any]:
    return spec(resources={"requests": q})


def _limits(**q: Any) -> dict[str, Any]:
    return spec(resources={"limits": q})


def _tol(**t: Any) -> dict[str, Any]:
    return spec(placement={"tolerations": [t]})


def _expr(**e: Any) -> dict[str, Any]:
    return spec(placement={"matchExpressions": [e]})


def _training(**t: Any) -> dict[str, Any]:
    return spec(training=t)


def _checkpoint(**c: Any) -> dict[str, Any]:
    return spec(training={"checkpoint": c})


def _model(**m: Any) -> dict[str, Any]:
    # model is replaced as a whole: the base's preset goes away unless given again
    return {"spec": {"model": None}} if not m else spec(model={"preset": None, **m})


def _layer(i: int, **over: Any) -> dict[str, Any]:
    layer = {"name": f"l{i}", "forwardFlops": 1e6, "backwardInputFlops": 1e6,
             "backwardWeightFlops": 1e6, "paramCount": 10, "paramBytes": 40,
             "outputBytes": 64, "stashBytes": 64}
    layer.update(over)
    return {k: v for k, v in layer.items() if v is not None}


def _profile(n: int = 2, **over: Any) -> dict[str, Any]:
    return {"name": "mine", "layers": [_layer(i) for i in range(n)], **over}


GPT = {"numLayers": 4, "dModel": 64, "numHeads": 4, "seqLen": 32, "vocabSize": 256}
RESNET = {"block": "basic", "stageBlocks": [1, 1], "width": 8, "imageSize": 16, "numClasses": 10}
MLP = {"inFeatures": 8, "hidden": 16, "numLayers": 3, "numClasses": 4}
S = "spec"
TOL0 = "spec.placement.tolerations[0]"
EXPR0 = "spec.placement.matchExpressions[0]"
CKPT = "spec.training.checkpoint"
LONG_PREFIX = ".".join(["a" * 60] * 4) + ".bbbbbbbbbbbbbbbbbbbb"  # 264 characters
DIGEST = "sha256:" + "0123456789abcdef" * 4

CASES: list[Case] = [
    # --- resource quantities (container requests and limits) ---------------------------------
    reject("quantity-semver", _requests(cpu="1.5.0"), f"{S}.resources.requests.cpu"),
    reject("quantity-word", _requests(memory="abc"), f"{S}.resources.requests.memory"),
    reject("quantity-negative-string", _limits(memory="-1"), f"{S}.resources.limits.memory"),
    reject("quantity-negative-int", _requests(cpu=-1), f"{S}.resources.requests.cpu"),
    reject("quantity-exponent-huge", _requests(memory="1e400"), f"{S}.resources.requests.memory",
           api.QUANTITY_RULE),
    reject("quantity-over-1pi", _limits(memory="2Pi"), f"{S}.resources.limits.memory",
           api.QUANTITY_RULE),
    reject("quantity-int-too-large", _requests(cpu=2**60), f"{S}.resources.requests.cpu"),
    reject("quantity-float", _requests(cpu=0.5), f"{S}.resources.requests.cpu"),
    reject("quantity-bool", _requests(cpu=True), f"{S}.resources.requests.cpu"),
    reject("quantity-space", _limits(memory="1 Gi"), f"{S}.resources.limits.memory"),
    reject("quantity-lowercase-suffix", _limits(memory="4gi"), f"{S}.resources.limits.memory"),
    reject("quantity-fractional-exponent", _requests(cpu="1e1.5"), f"{S}.resources.requests.cpu"),
    reject("quantity-too-long", _requests(cpu="1" + "0" * 40), f"{S}.resources.requests.cpu"),
    reject("resource-name-unprefixed", _requests(gpu="1"), f"{S}.resources.requests",
           api.RESOURCE_NAMES_RULE),
    reject("resource-name-uppercase", _limits(CPU="1"), f"{S}.resources.limits",
           api.RESOURCE_NAMES_RULE),
    reject("request-over-limit", spec(resources={"requests": {"cpu": "4"},
                                                 "limits": {"cpu": 2}}),
           f"{S}.resources.requests", api.REQUESTS_LE_LIMITS_RULE),
    reject("request-over-limit-units", spec(resources={"requests": {"memory": "2Gi"},
                                                       "limits": {"memory": "2000Mi"}}),
           f"{S}.resources.requests", api.REQUESTS_LE_LIMITS_RULE),
    reject("resources-unknown-field", spec(resources={"claims": [{"name": "x"}]}),
           f"{S}.resources.claims"),
    accept("quantities-valid", spec(resources={
        "requests": {"cpu": "500m", "memory": "4Gi", "ephemeral-storage": "1e9"},
        "limits": {"cpu": 2, "memory": "8Gi", "nvidia.com/gpu": 1}})),
    accept("quantities-decimal", spec(resources={"requests": {"cpu": "1.5", "memory": ".5Gi"},
                                                 "limits": {"cpu": "+2", "memory": "1Pi"}})),
    accept("quantity-hugepages", spec(resources={"requests": {"hugepages-2Mi": "1Gi"},
                                                 "limits": {"hugepages-2Mi": "1Gi"}})),
    # --- tolerations --------------------------------------------------------------------------
    reject("toleration-bad-operator", _tol(key="a", operator="Equals", value="b"),
           f"{TOL0}.operator"),
    reject("toleration-bad-effect", _tol(key="a", operator="Exists", effect="NoRun"),
           f"{TOL0}.effect"),
    reject("toleration-exists-with-value", _tol(key="a", operator="Exists", value="b"),
           f"{TOL0}.value", api.EXISTS_VALUE_RULE),
    reject("toleration-seconds-without-noexecute",
           _tol(key="a", operator="Exists", effect="NoSchedule", tolerationSeconds=60),
           f"{TOL0}.tolerationSeconds", api.TOLERATION_SECONDS_RULE),
    reject("toleration-seconds-without-effect", _tol(key="a", value="b", tolerationSeconds=60),
           f"{TOL0}.tolerationSeconds", api.TOLERATION_SECONDS_RULE),
    reject("toleration-equal-without-key", _tol(operator="Equal", value="b"),
           f"{TOL0}.operator", api.EMPTY_KEY_RULE),
    reject("toleration-bad-key", _tol(key="bad key!", operator="Exists"), f"{TOL0}.key"),
    reject("toleration-key-prefix-too-long", _tol(key=LONG_PREFIX + "/k", operator="Exists"),
           f"{TOL0}.key", api.LABEL_PREFIX_RULE),
    reject("toleration-negative-seconds",
           _tol(key="a", operator="Exists", effect="NoExecute", tolerationSeconds=-5),
           f"{TOL0}.tolerationSeconds"),
    reject("toleration-seconds-string",
           _tol(key="a", operator="Exists", effect="NoExecute", tolerationSeconds="60"),
           f"{TOL0}.tolerationSeconds"),
    reject("toleration-value-too-long", _tol(key="a", value="v" * 64), f"{TOL0}.value"),
    reject("toleration-value-invalid", _tol(key="a", value="with space"), f"{TOL0}.value"),
    reject("tolerations-too-many",
           spec(placement={"tolerations": [{"key": f"k{i}", "operator": "Exists"}
                                           for i in range(33)]}),
           f"{S}.placement.tolerations"),
    accept("toleration-exists-matches-all", _tol(operator="Exists")),
    accept("toleration-noexecute-seconds",
           _tol(key="node.kubernetes.io/unreachable", operator="Exists", effect="NoExecute",
                tolerationSeconds=300)),
    # --- label keys and values: nodeSelector, matchExpressions --------------------------------
    reject("node-selector-key-space", spec(placement={"nodeSelector": {"bad key": "x"}}),
           f"{S}.placement.nodeSelector", api.NODE_SELECTOR_KEYS_RULE),
    reject("node-selector-key-name-too-long",
           spec(placement={"nodeSelector": {"a" * 64: "x"}}),
           f"{S}.placement.nodeSelector", api.NODE_SELECTOR_KEYS_RULE),
    reject("node-selector-key-uppercase-prefix",
           spec(placement={"nodeSelector": {"Example.com/tier": "x"}}),
           f"{S}.placement.nodeSelector", api.NODE_SELECTOR_KEYS_RULE),
    reject("node-selector-key-prefix-too-long",
           spec(placement={"nodeSelector": {LONG_PREFIX + "/tier": "x"}}),
           f"{S}.placement.nodeSelector", api.NODE_SELECTOR_KEYS_RULE),
    reject("node-selector-value-space", spec(placement={"nodeSelector": {"tier": "cloud edge"}}),
           f"{S}.placement.nodeSelector.tier"),
    reject("node-selector-value-too-long", spec(placement={"nodeSelector": {"tier": "x" * 64}}),
           f"{S}.placement.nodeSelector.tier"),
    reject("node-selector-value-number", spec(placement={"nodeSelector": {"gpus": 4}}),
           f"{S}.placement.nodeSelector.gpus"),
    reject("match-expression-key-invalid", _expr(key="-tier", operator="Exists"),
           f"{EXPR0}.key"),
    reject("match-expression-bad-operator", _expr(key="tier", operator="Equals",
                                                  values=["cloud"]), f"{EXPR0}.operator"),
    reject("match-expression-gt-word", _expr(key="gpus", operator="Gt", values=["four"]),
           f"{EXPR0}.values", api.MATCH_VALUES_RULE),
    reject("match-expression-gt-two-values", _expr(key="gpus", operator="Gt",
                                                   values=["1", "2"]),
           f"{EXPR0}.values", api.MATCH_VALUES_RULE),
    reject("match-expression-in-without-values", _expr(key="tier", operator="In"),
           f"{EXPR0}.values", api.MATCH_VALUES_RULE),
    reject("match-expression-exists-with-values", _expr(key="tier", operator="Exists",
                                                        values=["x"]),
           f"{EXPR0}.values", api.MATCH_VALUES_RULE),
    reject("match-expression-value-too-long", _expr(key="tier", operator="In",
                                                    values=["x" * 64]), f"{EXPR0}.values[0]"),
    reject("max-devices-zero", spec(placement={"maxDevices": 0}), f"{S}.placement.maxDevices"),
    reject("tolerate-node-taints-string", spec(placement={"tolerateNodeTaints": "yes"}),
           f"{S}.placement.tolerateNodeTaints"),
    accept("node-selector-prefixed-and-empty-value",
           spec(placement={"nodeSelector": {"node.kubernetes.io/instance-type": "k3s",
                                            "node-role.kubernetes.io/edge": ""}})),
    accept("match-expression-lt-negative", _expr(key="spantrain.io/latency-ms", operator="Lt",
                                                 values=["-5"])),
    # --- names that become object names (job, claim, scheduler, priority class, account) ------
    reject("job-name-uppercase", {"metadata": {"name": "GPT-Local"}}, "metadata.name"),
    reject("job-name-too-long", {"metadata": {"name": "g" * 41}}, "metadata.name",
           api.JOB_NAME_RULE),
    reject("job-name-dot", {"metadata": {"name": "gpt.local"}}, "metadata.name",
           api.JOB_NAME_RULE),
    reject("job-name-leading-digit", {"metadata": {"name": "1gpt"}}, "metadata.name",
           api.JOB_NAME_RULE),
    reject("claim-name-uppercase", _checkpoint(claimName="PVC"), f"{CKPT}.claimName"),
    reject("claim-name-underscore", _checkpoint(claimName="my_pvc"), f"{CKPT}.claimName"),
    reject("claim-without-path", _checkpoint(path=None, claimName="pvc"), f"{CKPT}.path",
           api.CLAIM_PATH_RULE),
    reject("checkpoint-path-relative", _checkpoint(path="ckpt"), f"{CKPT}.path"),
    reject("checkpoint-path-dotdot", _checkpoint(path="/tmp/../etc"), f"{CKPT}.path"),
    reject("checkpoint-path-root", _checkpoint(path="/"), f"{CKPT}.path"),
    reject("checkpoint-path-under-plan", _checkpoint(path="/etc/spantrain/plan/ck"),
           f"{CKPT}.path", api.NOT_PLAN_RULE),
    reject("checkpoint-claim-on-scratch", _checkpoint(path="/tmp", claimName="pvc"),
           f"{CKPT}.path", api.NOT_SCRATCH_RULE),
    reject("scheduler-name-invalid", spec(scheduling={"schedulerName": "My Scheduler"}),
           f"{S}.scheduling.schedulerName"),
    reject("priority-class-invalid", spec(scheduling={"priorityClassName": "High_Priority"}),
           f"{S}.scheduling.priorityClassName"),
    reject("queue-invalid", spec(scheduling={"gang": "volcano", "queue": "q!"}),
           f"{S}.scheduling.queue"),
    reject("service-account-invalid", spec(serviceAccountName="Default"),
           f"{S}.serviceAccountName"),
    reject("service-account-empty", spec(serviceAccountName=""), f"{S}.serviceAccountName"),
    reject("gang-volcano-other-scheduler",
           spec(scheduling={"gang": "volcano", "schedulerName": "default-scheduler"}),
           f"{S}.scheduling.schedulerName", api.VOLCANO_SCHEDULER_RULE),
    accept("claim-with-path", _checkpoint(path="/data/ck", claimName="spantrain-checkpoints")),
    accept("claim-below-scratch", _checkpoint(path="/tmp/ck", claimName="pvc.v1")),
    accept("gang-volcano-queue", spec(scheduling={"gang": "volcano", "queue": "training",
                                                  "priorityClassName": "high"})),
    # --- images ------------------------------------------------------------------------------
    reject("image-empty", spec(image=""), f"{S}.image"),
    reject("image-with-space", spec(image="ghcr.io/spantrain/spantrain 0.1.0"), f"{S}.image"),
    reject("image-uppercase-repository", spec(image="ghcr.io/SpanTrain/spantrain:0.1"),
           f"{S}.image"),
    reject("image-empty-tag", spec(image="spantrain:"), f"{S}.image"),
    reject("image-number", spec(image=123), f"{S}.image"),
    reject("images-unknown-arch", spec(images={"x86_64": "spantrain:0.1"}), f"{S}.images",
           api.IMAGES_KEYS_RULE),
    reject("images-empty-value", spec(images={"arm64": ""}), f"{S}.images.arm64"),
    reject("image-pull-policy-unknown", spec(imagePullPolicy="Sometimes"),
           f"{S}.imagePullPolicy"),
    accept("image-registry-port-digest",
           spec(image=f"registry.local:5000/team/spantrain:0.1.0@{DIGEST}")),
    accept("images-per-arch", spec(images={"amd64": "spantrain:0.1",
                                           "arm64": "ghcr.io/spantrain/spantrain:0.1-l4t"})),
    # --- strict scalars: words for numbers, numbers for booleans, floats for integers ---------
    reject("steps-string", _training(steps="300"), f"{S}.training.steps"),
    reject("steps-fraction", _training(steps=300.5), f"{S}.training.steps"),
    # 300.0 passes the API server's OpenAPI integer check; api.INTEGER_RULE refuses it
    reject("steps-whole-float", _training(steps=300.0), f"{S}.training.steps",
           api.INTEGER_RULE),
    reject("seed-whole-float", _training(seed=5.0), f"{S}.training.seed", api.INTEGER_RULE),
    reject("port-whole-float", spec(rendezvous={"port": 29500.0}), f"{S}.rendezvous.port",
           api.INTEGER_RULE),
    reject("stage-blocks-whole-float",
           _model(family="resnet", config={**RESNET, "stageBlocks": [1.0, 2]}),
           f"{S}.model.config.stageBlocks[0]", api.INTEGER_RULE),
    reject("quantity-whole-float", _requests(cpu=2.0), f"{S}.resources.requests.cpu",
           api.QUANTITY_RULE),
    reject("steps-int64-overflow", _training(steps=2**63), f"{S}.training.steps"),
    reject("steps-bool", _training(steps=True), f"{S}.training.steps"),
    reject("steps-zero", _training(steps=0, warmupSteps=0), f"{S}.training.steps"),
    reject("steps-negative", _training(steps=-1, warmupSteps=0), f"{S}.training.steps"),
    reject("steps-over-bound", _training(steps=1_000_000_001), f"{S}.training.steps"),
    reject("global-batch-string", _training(globalBatch="16"), f"{S}.training.globalBatch"),
    reject("global-batch-fraction", _training(globalBatch=16.5), f"{S}.training.globalBatch"),
    reject("global-batch-zero", _training(globalBatch=0), f"{S}.training.globalBatch"),
    reject("learning-rate-string", _training(learningRate="1e-3"),
           f"{S}.training.learningRate"),
    reject("learning-rate-zero", _training(learningRate=0), f"{S}.training.learningRate"),
    reject("learning-rate-absurd", _training(learningRate=100), f"{S}.training.learningRate"),
    reject("learning-rate-negative", _training(learningRate=-0.001),
           f"{S}.training.learningRate"),
    reject("weight-decay-negative", _training(weightDecay=-0.1), f"{S}.training.weightDecay"),
    reject("weight-decay-over-one", _training(weightDecay=2), f"{S}.training.weightDecay"),
    reject("grad-clip-negative", _training(gradClipNorm=-1), f"{S}.training.gradClipNorm"),
    reject("seed-over-uint32", _training(seed=2**32), f"{S}.training.seed"),
    reject("seed-negative", _training(seed=-1), f"{S}.training.seed"),
    reject("warmup-negative", _training(warmupSteps=-1), f"{S}.training.warmupSteps"),
    reject("interval-steps-zero", _checkpoint(intervalSteps=0), f"{CKPT}.intervalSteps"),
    reject("interval-steps-string", _checkpoint(intervalSteps="100"), f"{CKPT}.intervalSteps"),
    reject("suspend-string", spec(suspend="true"), f"{S}.suspend"),
    reject("suspend-int", spec(suspend=1), f"{S}.suspend"),
    reject("rendezvous-port-string", spec(rendezvous={"port": "29500"}),
           f"{S}.rendezvous.port"),
    reject("rendezvous-port-privileged", spec(rendezvous={"port": 80}), f"{S}.rendezvous.port"),
    reject("max-restarts-over-bound", spec(failurePolicy={"maxRestarts": 1001}),
           f"{S}.failurePolicy.maxRestarts"),
    reject("grace-period-string", spec(failurePolicy={"nodeLostGracePeriodSeconds": "5m"}),
           f"{S}.failurePolicy.nodeLostGracePeriodSeconds"),
    reject("replan-on-node-loss-string", spec(failurePolicy={"replanOnNodeLoss": "false"}),
           f"{S}.failurePolicy.replanOnNodeLoss"),
    reject("ttl-negative", spec(runPolicy={"ttlSecondsAfterFinished": -1}),
           f"{S}.runPolicy.ttlSecondsAfterFinished"),
    reject("active-deadline-zero", spec(runPolicy={"activeDeadlineSeconds": 0}),
           f"{S}.runPolicy.activeDeadlineSeconds"),
    reject("schedule-timeout-over-bound", spec(scheduling={"scheduleTimeoutSeconds": 86401}),
           f"{S}.scheduling.scheduleTimeoutSeconds"),
    reject("env-value-number", spec(env=[{"name": "FOO", "value": 3}]), f"{S}.env[0].value"),
    reject("microbatches-zero", spec(planner={"numMicrobatches": 0}),
           f"{S}.planner.numMicrobatches"),
    reject("microbatches-string", spec(planner={"numMicrobatches": "4"}),
           f"{S}.planner.numMicrobatches"),
    reject("network-cut-ratio-one", spec(planner={"networkCutRatio": 1}),
           f"{S}.planner.networkCutRatio"),
    reject("compute-tolerance-negative", spec(planner={"computeTolerance": -0.1}),
           f"{S}.planner.computeTolerance"),
    reject("max-stages-over-bound", spec(planner={"maxStages": 5000}),
           f"{S}.planner.maxStages"),
    reject("allow-exclusion-string", spec(planner={"allowExclusion": "no"}),
           f"{S}.planner.allowExclusion"),
    accept("learning-rate-integer", _training(learningRate=1)),
    accept("bounds-inclusive", _training(learningRate=10, steps=1_000_000_000,
                                         warmupSteps=1_000_000_000, seed=2**32 - 1,
                                         weightDecay=1)),
    # --- the model ---------------------------------------------------------------------------
    reject("missing-model", _model(), f"{S}.model"),
    reject("no-model-source", _model(name="nothing"), f"{S}.model", api.MODEL_SOURCE_RULE),
    reject("preset-and-family", _model(preset="gpt-mini", family="gpt", config=GPT),
           f"{S}.model", api.MODEL_SOURCE_RULE),
    reject("config-without-family", _model(preset="gpt-mini", config={"numLayers": 4}),
           f"{S}.model", api.CONFIG_FAMILY_RULE),
    reject("profile-without-entrypoint", _model(preset="gpt-mini", profile=_profile()),
           f"{S}.model", api.PROFILE_ENTRYPOINT_RULE),
    reject("family-without-config", _model(family="gpt"), f"{S}.model.config",
           api.FAMILY_RULES["gpt"]),
    reject("family-config-incomplete",
           _model(family="mlp", config={k: v for k, v in MLP.items() if k != "hidden"}),
           f"{S}.model.config", api.FAMILY_RULES["mlp"]),
    reject("family-config-foreign-key", _model(family="resnet", config={**RESNET,
                                                                         "numLayers": 4}),
           f"{S}.model.config", api.FAMILY_RULES["resnet"]),
    reject("family-config-unknown-key", _model(family="gpt", config={**GPT, "depth": 3}),
           f"{S}.model.config.depth"),
    reject("family-config-word", _model(family="gpt", config={**GPT, "numLayers": "six"}),
           f"{S}.model.config.numLayers"),
    reject("family-too-deep", _model(family="gpt", config={**GPT, "numLayers": 1000}),
           f"{S}.model.config.numLayers"),
    reject("gpt-heads-not-a-divisor", _model(family="gpt", config={**GPT, "dModel": 100,
                                                                  "numHeads": 3}),
           f"{S}.model.config.dModel", api.HEADS_RULE),
    reject("resnet-too-many-stages", _model(family="resnet", config={**RESNET,
                                                                     "stageBlocks": [1] * 9}),
           f"{S}.model.config.stageBlocks"),
    reject("resnet-bad-block", _model(family="resnet", config={**RESNET, "block": "wide"}),
           f"{S}.model.config.block"),
    reject("family-unknown", _model(family="transformer", config=GPT), f"{S}.model.family"),
    reject("entrypoint-with-space", _model(entrypoint="my model:build", profile=_profile()),
           f"{S}.model.entrypoint"),
    reject("profile-too-deep", _model(entrypoint="my.pkg:build",
                                      profile=_profile(api.MAX_MODEL_LAYERS + 1)),
           f"{S}.model.profile.layers"),
    reject("profile-without-layers", _model(entrypoint="my.pkg:build",
                                            profile={"name": "mine"}),
           f"{S}.model.profile.layers"),
    reject("profile-layer-missing-flops",
           _model(entrypoint="my.pkg:build",
                  profile={"name": "mine", "layers": [_layer(0, forwardFlops=None)]}),
           f"{S}.model.profile.layers[0].forwardFlops"),
    reject("profile-layer-negative-params",
           _model(entrypoint="my.pkg:build",
                  profile={"name": "mine", "layers": [_layer(0, paramCount=-1)]}),
           f"{S}.model.profile.layers[0].paramCount"),
    reject("profile-unknown-key", _model(entrypoint="my.pkg:build",
                                         profile=_profile(numLayers=2)),
           f"{S}.model.profile.numLayers"),
    reject("preset-invalid-name", _model(preset="GPT Mini"), f"{S}.model.preset"),
    accept("family-gpt", _model(family="gpt", name="gpt-4l", config=GPT)),
    accept("family-resnet", _model(family="resnet", config=RESNET)),
    accept("family-mlp-max-depth", _model(family="mlp", config={**MLP, "numLayers": 510})),
    accept("entrypoint-profile-as-written",
           _model(entrypoint="my.pkg:build",
                  profile=_profile(apiVersion="spantrain.io/v1alpha1", kind="ModelProfile",
                                   family="custom", config={}, bytesPerElement=4))),
    accept("profile-max-depth", _model(entrypoint="my.pkg:build",
                                       profile=_profile(api.MAX_MODEL_LAYERS))),
    # --- enums, unknown and missing fields, lists --------------------------------------------
    reject("schedule-unknown", spec(planner={"schedule": "pipedream"}), f"{S}.planner.schedule"),
    reject("precision-unknown", _training(precision="fp16"), f"{S}.training.precision"),
    reject("optimizer-unknown", _training(optimizer="sgd"), f"{S}.training.optimizer"),
    reject("address-mode-unknown", spec(rendezvous={"addressMode": "edgemesh"}),
           f"{S}.rendezvous.addressMode"),
    reject("clean-pod-policy-unknown", spec(runPolicy={"cleanPodPolicy": "Some"}),
           f"{S}.runPolicy.cleanPodPolicy"),
    reject("gang-unknown", spec(scheduling={"gang": "kube-batch"}), f"{S}.scheduling.gang"),
    reject("unknown-field-training", _training(epochs=3), f"{S}.training.epochs"),
    reject("unknown-field-spec", spec(replicas=3), f"{S}.replicas"),
    reject("unknown-field-toleration", _tol(key="a", operator="Exists", seconds=5),
           f"{TOL0}.seconds"),
    reject("snake-case-field", _training(global_batch=8), f"{S}.training.global_batch"),
    reject("data-corpus-empty", _training(data={"corpus": ""}), f"{S}.training.data.corpus"),
    reject("warmup-longer-than-steps", _training(steps=100, warmupSteps=500),
           f"{S}.training.warmupSteps", api.WARMUP_RULE),
    reject("microbatches-over-batch", spec(planner={"numMicrobatches": 32}),
           f"{S}.planner.numMicrobatches", api.MICROBATCHES_RULE),
    reject("env-reserved", spec(env=[{"name": "RANK", "value": "3"}]), f"{S}.env[0]",
           RESERVED_ENV_MESSAGE),
    reject("env-reserved-prefix", spec(env=[{"name": "SPANTRAIN_PLAN", "value": "/x"}]),
           f"{S}.env[0]", RESERVED_ENV_MESSAGE),
    reject("env-duplicated", spec(env=[{"name": "FOO", "value": "1"},
                                       {"name": "FOO", "value": "2"}]), f"{S}.env[1]"),
    reject("env-name-invalid", spec(env=[{"name": "1FOO=bar", "value": "x"}]),
           f"{S}.env[0].name"),
    reject("env-name-missing", spec(env=[{"value": "x"}]), f"{S}.env[0].name"),
    reject("env-too-many", spec(env=[{"name": f"V{i}", "value": ""} for i in range(65)]),
           f"{S}.env"),
    reject("match-expressions-not-a-list",
           spec(placement={"matchExpressions": {"key": "a", "operator": "Exists"}}),
           f"{S}.placement.matchExpressions"),
    accept("base", {}),
    accept("env-ordinary", spec(env=[{"name": "HF_HOME", "value": "/tmp/hf"},
                                     {"name": "lower.case-ok", "value": ""}])),
]


def by_name() -> dict[str, Case]:
    return {case.name: case for case in CASES}
