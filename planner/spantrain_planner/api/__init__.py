"""The ``SpanTrainJob`` API (group ``spantrain.io``, version ``v1alpha1``, short name ``stj``).

Role: the single source of truth for the custom resource. The CRD under ``crds/`` is generated
from these models (``spantrain_planner.api.crd``), the operator parses every object it sees with
them, and ``spantrain local`` reads a job manifest with them, so a field means the same thing
everywhere. Field descriptions become ``kubectl explain`` text; ``x-kubernetes-validations``
(CEL) rules attached here are enforced by the API server and mirrored by pydantic validators,
so a bad manifest fails the same way with or without a cluster.

Validation once: the spec models are *strict* where the API server is (``"5"`` is not an
integer, ``"true"`` not a boolean, ``1.0`` not an integer), every number is bounded, and every
field that becomes a pod field carries the Kubernetes rule for it (quantities, label keys and
values, DNS-1123 names, image references, toleration combinations), so nothing the API server
admits fails later when the operator creates pods. Each CEL rule is a :class:`Rule`: the
same object renders the CRD's ``x-kubernetes-validations`` entry (with its ``fieldPath``) and
raises the pydantic error, so both name the same field (``error_lines`` prints pydantic errors
with Kubernetes field paths such as ``spec.placement.tolerations[0].value``).
``tests/corpus/bad_manifests.py`` holds the bad-manifest corpus both are checked against.

Also ``planner_inputs(spec)``: the pure translation of a spec into what the planner needs
(``ModelProfile`` and ``PlannerOptions``).

Pure: pydantic and planner modules only; must not import torch, kopf or a Kubernetes client.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails, PydanticCustomError

from spantrain_planner.core import contract
from spantrain_planner.core.errors import InputError
from spantrain_planner.core.options import (
    DEFAULT_ADAPT,
    AdaptMode,
    PlannerOptions,
    ScheduleChoice,
)
from spantrain_planner.core.units import QUANTITY, quantity_value
from spantrain_planner.inputs.cluster import load_document
from spantrain_planner.inputs.profiles import ModelProfile, build_profile, preset, preset_names

GROUP = "spantrain.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SpanTrainJob"
LIST_KIND = "SpanTrainJobList"
PLURAL = "spantrainjobs"
SINGULAR = "spantrainjob"
SHORT_NAMES = ("stj",)
CATEGORIES = ("spantrain", "ml")

#: Job names become Service names and pod-name prefixes (``<job>-a<attempt>-r<rank>``, a DNS
#: label of at most 63 characters), so they are shorter RFC 1035 labels.
MAX_JOB_NAME = 40
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

#: Environment names the operator sets on every worker; user ``env`` may not override them.
RESERVED_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "PET_NNODES",
    "PET_NODE_RANK",
    "PET_NPROC_PER_NODE",
    "PYTHONUNBUFFERED",
)

#: The deepest model the planner is asked to cut, in planner layers (embedding/stem and head
#: included). Planning time grows about quadratically with depth (a GPT of d=128 on
#: examples/clusters/paper-env1.yaml, 2 busy cores: 128 layers 0.7 s, 256 1.9 s, 512 6.4 s;
#: the issue measured 30 s for 1,000), so deeper models are refused at admission instead of
#: stalling the operator's planning queue.
MAX_MODEL_LAYERS = 512
#: ``model.config.numLayers`` bound: a GPT adds an embedding and a head layer.
MAX_FAMILY_LAYERS = MAX_MODEL_LAYERS - 2
#: Optimizer steps (and warm-up, checkpoint interval) bound.
MAX_STEPS = 1_000_000_000
#: Peak learning rate bound (exclusive of 0).
MAX_LEARNING_RATE = 10.0
#: Largest resource quantity (requests and limits), in base units: 1Pi. Anything larger is
#: no real container's resource, and Kubernetes silently caps quantities near 2**63.
MAX_QUANTITY = "1Pi"
MAX_QUANTITY_VALUE = 2**50
#: Longest quantity string, and most resources a map may name (the API server's CEL cost
#: budget for the quantity rules is spent by their product).
MAX_QUANTITY_LENGTH = 32
MAX_RESOURCES = 6
#: ``spec.images`` keys: the kubernetes.io/arch values of the platforms Kubernetes ships for.
ARCHITECTURES = ("amd64", "arm64", "arm", "ppc64le", "s390x")
#: Mount points every worker pod has (defined by the process contract).
PLAN_MOUNT = contract.PLAN_MOUNT
SCRATCH_MOUNT = contract.SCRATCH_MOUNT

_ENTRYPOINT = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
#: Kubernetes name syntax (k8s.io/apimachinery/pkg/util/validation). The patterns are written
#: for both Go's RE2 (the API server) and Rust's regex (pydantic): no look-around, no ``\w``.
_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
DNS1123_SUBDOMAIN = rf"^{_SUBDOMAIN}$"
#: A qualified name (label key, taint key): an optional DNS-subdomain prefix and ``/``, then a
#: name of at most 63 characters. The prefix's 253-character bound is ``LABEL_PREFIX_RULE``.
QUALIFIED_NAME = rf"^({_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
#: A resource quantity, as Kubernetes' quantity grammar but without a sign (a negative request
#: is no request) and with an integer exponent.
#: A container resource name: a standard one or a domain-prefixed extended resource.
RESOURCE_NAME = (
    rf"^(cpu|memory|ephemeral-storage|hugepages-[0-9]+[KMGTPE]i|"
    rf"{_SUBDOMAIN}/[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?)$"
)
#: A container image reference (the grammar of distribution/reference, IPv6 hosts aside).
_IMAGE_PATH = r"[a-z0-9]+(([._]|__|[-]+)[a-z0-9]+)*"
_IMAGE_HOST = r"([a-zA-Z0-9]|[a-zA-Z0-9][-a-zA-Z0-9]*[a-zA-Z0-9])"
IMAGE_REF = (
    rf"^({_IMAGE_HOST}(\.{_IMAGE_HOST})*(:[0-9]+)?/)?{_IMAGE_PATH}(/{_IMAGE_PATH})*"
    r"(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?"
    r"(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
#: An absolute path without empty, ``.`` or ``..`` components (a container mount path).
ABSOLUTE_PATH = r"^(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))+$"
CONDITION_TYPE_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"  # noqa: E501
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


# ---------------------------------------------------------------------------------------------
# CEL rules and their pydantic mirrors

#: Every :class:`Rule` defined here, in definition order (a unit test checks each is in the CRD
#: and each is exercised by the bad-manifest corpus).
RULES: list[Rule] = []


@dataclass(frozen=True)
class Rule:
    """One ``x-kubernetes-validations`` rule and its pydantic mirror.

    ``field`` is the rule's ``fieldPath`` relative to the object the rule sits on (``.steps``;
    empty: the object itself). The API server reports a broken rule at that path, and
    :meth:`error` makes pydantic report it there too (``error_lines``)."""

    rule: str
    message: str
    field: str = ""
    #: False where the API server cannot take ``fieldPath`` (an undeclared field); the path
    #: then only shows in pydantic's error, and the message names the field in words.
    cel_field_path: bool = True
    #: True where the pydantic mirror is the field's strict type itself (no validator raises
    #: :meth:`error`; pydantic's own type error names the field).
    mirrored_by_type: bool = False

    def __post_init__(self) -> None:
        RULES.append(self)

    @property
    def transition(self) -> bool:
        """A transition rule (``oldSelf``): checked on updates by the API server only."""
        return "oldSelf" in self.rule

    def cel(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field and self.cel_field_path:
            out["fieldPath"] = self.field
        return out

    def error(self, detail: str = "") -> PydanticCustomError:
        """The pydantic error of a broken rule: the rule's message (plus ``detail``)."""
        text = self.message + (f" ({detail})" if detail else "")
        return PydanticCustomError(
            "spantrain_rule", "{message}", {"message": text, "field": self.field, "rule": self.rule}
        )


#: On every integer of the spec (``crd`` adds it): the API server's OpenAPI check takes 5.0 for
#: an integer, and only a CEL rule reading the value refuses it, naming the field. pydantic's
#: strict ``int`` is the mirror.
INTEGER_RULE = Rule(
    "type(self) == int", "must be an integer, not a number such as 5.0", mirrored_by_type=True
)


def _invalid(field: str, message: str) -> PydanticCustomError:
    """A pydantic error at ``field`` (relative, ``.x`` or ``[i]``) mirroring an OpenAPI check."""
    return PydanticCustomError(
        "spantrain_invalid", "{message}", {"message": message, "field": field}
    )


def _cel(*rules: Rule | tuple[str, str]) -> dict[str, Any]:
    """``x-kubernetes-validations`` entries: rules, or (rule, message) pairs."""
    return {
        "x-kubernetes-validations": [
            r.cel() if isinstance(r, Rule) else {"rule": r[0], "message": r[1]} for r in rules
        ]
    }


def _re(pattern: str) -> str:
    """A regular expression as a CEL raw string literal."""
    assert "'" not in pattern, pattern
    return f"r'{pattern}'"


_FREEFORM: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


def _default_of(model: type[BaseModel]) -> dict[str, Any]:
    """A CRD ``default`` for an optional sub-object: the model's fully defaulted value (the
    API server runs CEL rules on a default as written, so ``{}`` would not do)."""
    return {"default": model().model_dump(mode="json", by_alias=True, exclude_none=True)}


class _Spec(BaseModel):
    # strict: the API server takes no "5" for an integer, no "true" for a boolean, no 1.0 for
    # an integer; neither does pydantic (an integer is still a number, as in OpenAPI)
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
    )


class _Status(BaseModel):
    # Status is written by the operator and read back; tolerate fields a newer operator wrote.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# ---------------------------------------------------------------------------------------------
# Kubernetes value types


LABEL_PREFIX_RULE = Rule(
    "self.indexOf('/') <= 253",
    "the prefix of a qualified name (before the /) is a DNS subdomain of at most 253 characters",
)


def _label_prefix(value: str) -> str:
    if value.find("/") > 253:
        raise LABEL_PREFIX_RULE.error()
    return value


#: A label key, taint key or node-selector key (a Kubernetes qualified name).
LabelKey = Annotated[
    str,
    Field(max_length=317, pattern=QUALIFIED_NAME, json_schema_extra=_cel(LABEL_PREFIX_RULE)),
    AfterValidator(_label_prefix),
]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]
DnsSubdomain = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
ImageRef = Annotated[str, Field(min_length=1, max_length=1024, pattern=IMAGE_REF)]

QUANTITY_RULE = Rule(
    f"type(self) == int || (type(self) == string && isQuantity(self) && "
    f"quantity(self).compareTo(quantity('{MAX_QUANTITY}')) <= 0)",
    f"must be an integer or a resource quantity string of at most {MAX_QUANTITY}",
)


def _quantity(value: object) -> int | str:
    """A resource quantity: an integer or a quantity string (int-or-string, as in a Pod)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise QUANTITY_RULE.error(f"got {type(value).__name__}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_QUANTITY_VALUE:
            raise PydanticCustomError(
                "quantity_range",
                "{message}",
                {"message": f"must be between 0 and {MAX_QUANTITY_VALUE}"},
            )
        return value
    if len(value) > MAX_QUANTITY_LENGTH or re.fullmatch(QUANTITY, value) is None:
        raise PydanticCustomError(
            "quantity_pattern",
            "{message}",
            {
                "message": "must be a non-negative resource quantity such as 2, 500m, 1.5 or 4Gi "
                f"(at most {MAX_QUANTITY_LENGTH} characters matching {QUANTITY})"
            },
        )
    amount = quantity_value(value)
    if amount is None or amount > MAX_QUANTITY_VALUE:
        raise QUANTITY_RULE.error(value)
    return value


#: A resource quantity (``2``, ``500m``, ``4Gi``, ``1.5``): x-kubernetes-int-or-string.
Quantity = Annotated[
    int | str,
    PlainValidator(_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY,
            "maxLength": MAX_QUANTITY_LENGTH,
            "minimum": 0,
            "maximum": MAX_QUANTITY_VALUE,
            **_cel(QUANTITY_RULE),
        }
    ),
]


# ---------------------------------------------------------------------------------------------
# spec.model

#: ``model.config`` keys of each built-in family (all required, no others).
FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    "gpt": ("numLayers", "dModel", "numHeads", "seqLen", "vocabSize"),
    "resnet": ("block", "stageBlocks", "width", "imageSize", "numClasses"),
    "mlp": ("inFeatures", "hidden", "numLayers", "numClasses"),
}
_CONFIG_KEYS = sorted({k for keys in FAMILY_KEYS.values() for k in keys})


def _family_rule(family: str) -> Rule:
    keys = FAMILY_KEYS[family]
    have = " && ".join(f"has(self.config.{k})" for k in keys)
    lack = " && ".join(f"!has(self.config.{k})" for k in _CONFIG_KEYS if k not in keys)
    return Rule(
        f"!has(self.family) || self.family != '{family}' || (has(self.config) && {have} && "
        f"{lack})",
        f"model.config of family {family} takes exactly {', '.join(keys)}",
        ".config",
    )


FAMILY_RULES = {family: _family_rule(family) for family in FAMILY_KEYS}
HEADS_RULE = Rule(
    "!has(self.dModel) || !has(self.numHeads) || self.dModel % self.numHeads == 0",
    "model.config.dModel must be a multiple of model.config.numHeads",
    ".dModel",
)


class FamilyConfig(_Spec):
    """Parameters of a built-in family: gpt takes numLayers, dModel, numHeads, seqLen and
    vocabSize; resnet block, stageBlocks, width, imageSize and numClasses; mlp inFeatures,
    hidden, numLayers and numClasses."""

    model_config = ConfigDict(json_schema_extra=_cel(HEADS_RULE))

    num_layers: int | None = Field(
        None,
        ge=1,
        le=MAX_FAMILY_LAYERS,
        description=f"gpt: transformer blocks; mlp: hidden layers (at most {MAX_FAMILY_LAYERS}: "
        f"the planner cuts models of at most {MAX_MODEL_LAYERS} layers).",
    )
    d_model: int | None = Field(None, ge=1, le=65536, description="gpt: model width.")
    num_heads: int | None = Field(None, ge=1, le=1024, description="gpt: attention heads.")
    seq_len: int | None = Field(None, ge=1, le=65536, description="gpt: context length.")
    vocab_size: int | None = Field(None, ge=1, le=1_048_576, description="gpt: vocabulary.")
    block: Literal["basic", "bottleneck"] | None = Field(
        None, description="resnet: residual block kind."
    )
    stage_blocks: list[Annotated[int, Field(ge=1, le=63)]] | None = Field(
        None, min_length=1, max_length=8, description="resnet: blocks per stage (1-8 stages)."
    )
    width: int | None = Field(None, ge=1, le=4096, description="resnet: stem width.")
    image_size: int | None = Field(None, ge=1, le=4096, description="resnet: image side (px).")
    num_classes: int | None = Field(
        None, ge=1, le=1_048_576, description="resnet, mlp: output classes."
    )
    in_features: int | None = Field(None, ge=1, le=1_048_576, description="mlp: input width.")
    hidden: int | None = Field(None, ge=1, le=1_048_576, description="mlp: hidden width.")

    @model_validator(mode="after")
    def _heads(self) -> FamilyConfig:
        d, h = self.d_model, self.num_heads
        if d is not None and h is not None and d % h:
            raise HEADS_RULE.error(f"{d} % {h} != 0")
        return self


class ProfileLayer(_Spec):
    """One layer of a measured profile (costs per sample)."""

    name: str = Field(min_length=1, max_length=253, description="Layer name.")
    forward_flops: float = Field(ge=0, le=1e18, description="Forward FLOPs per sample.")
    backward_input_flops: float = Field(ge=0, le=1e18, description="B pass FLOPs per sample.")
    backward_weight_flops: float = Field(ge=0, le=1e18, description="W pass FLOPs per sample.")
    param_count: int = Field(ge=0, le=2**53, description="Trainable parameters.")
    param_bytes: int = Field(ge=0, le=2**53, description="Bytes of the trainable parameters.")
    output_bytes: int = Field(ge=0, le=2**53, description="Boundary activation bytes per sample.")
    stash_bytes: int = Field(
        ge=0, le=2**53, description="Activation bytes kept for backward per sample."
    )


class ProfileSpec(_Spec):
    """A measured model profile, as `spantrain profile` writes it."""

    api_version: str | None = Field(None, max_length=253, description="As written; ignored.")
    kind: str | None = Field(None, max_length=63, description="As written; ignored.")
    name: str | None = Field(None, min_length=1, max_length=253, description="Model name.")
    family: Literal["gpt", "resnet", "mlp", "custom"] | None = Field(
        None, description="As written; the profile of an entry point is always custom."
    )
    config: dict[str, Any] | None = Field(
        None, description="Builder parameters, as written.", json_schema_extra=_FREEFORM
    )
    entrypoint: str | None = Field(
        None, max_length=253, description="As written; model.entrypoint is used."
    )
    bytes_per_element: int | None = Field(
        None, ge=1, le=8, description="Bytes of one activation element the profile assumes."
    )
    layers: list[ProfileLayer] = Field(
        min_length=1,
        max_length=MAX_MODEL_LAYERS,
        description=f"The model's layers, first to last (at most {MAX_MODEL_LAYERS}: planning "
        "time grows about quadratically with depth).",
    )


MODEL_SOURCE_RULE = Rule(
    "[has(self.preset), has(self.family), has(self.entrypoint)].filter(x, x).size() == 1",
    "set exactly one of model.preset, model.family or model.entrypoint",
)

CONFIG_FAMILY_RULE = Rule(
    "!has(self.config) || has(self.family)", "model.config needs model.family"
)

PROFILE_ENTRYPOINT_RULE = Rule(
    "!has(self.profile) || has(self.entrypoint)", "model.profile needs model.entrypoint"
)

class ModelSpec(_Spec):
    """Which network to train: exactly one of a built-in preset, a built-in family with its
    parameters, or a user entry point (with its measured profile)."""


    model_config = ConfigDict(
        json_schema_extra=_cel(
            MODEL_SOURCE_RULE, CONFIG_FAMILY_RULE, PROFILE_ENTRYPOINT_RULE, *FAMILY_RULES.values()
        )
    )

    preset: str | None = Field(
        None,
        max_length=63,
        pattern=r"^[a-z0-9][-a-z0-9.]*$",
        description="A built-in model by name and size (e.g. gpt-mini, gpt2-small, resnet50); "
        "`spantrain plan --help` lists them.",
    )
    family: Literal["gpt", "resnet", "mlp"] | None = Field(
        None, description="A built-in model family, sized by `config`."
    )
    config: FamilyConfig | None = Field(
        None,
        description="Parameters of `family` (camelCase), all required: for gpt numLayers, "
        "dModel, numHeads, seqLen, vocabSize; for resnet block, stageBlocks, width, imageSize, "
        "numClasses; for mlp inFeatures, hidden, numLayers, numClasses.",
    )
    entrypoint: str | None = Field(
        None,
        max_length=253,
        pattern=_ENTRYPOINT,
        description="A user model: `module:function` returning layers, a loss and a dataset.",
    )
    profile: ProfileSpec | None = Field(
        None,
        description="The measured layer profile of the entry point's model (as written by "
        "`spantrain profile`); the planner needs it to cut the model.",
    )
    name: str | None = Field(
        None, max_length=63, description="Display name; defaults to the preset or family."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        # which source is given decides what the rest means (config's keys depend on the
        # family): checked on the input, before the fields
        if not isinstance(data, dict):
            return data
        given = [k for k in ("preset", "family", "entrypoint") if data.get(k) is not None]
        if len(given) != 1:
            raise MODEL_SOURCE_RULE.error(f"got {', '.join(given)}" if given else "")
        if data.get("config") is not None and data.get("family") is None:
            raise CONFIG_FAMILY_RULE.error()
        if data.get("profile") is not None and data.get("entrypoint") is None:
            raise PROFILE_ENTRYPOINT_RULE.error()
        return data

    @model_validator(mode="after")
    def _family_keys(self) -> ModelSpec:
        if self.family is not None:
            keys = set() if self.config is None else set(
                self.config.model_dump(by_alias=True, exclude_none=True)
            )
            if keys != set(FAMILY_KEYS[self.family]):
                given_keys = ", ".join(sorted(keys)) or "none"
                raise FAMILY_RULES[self.family].error(f"got {given_keys}")
        return self


# ---------------------------------------------------------------------------------------------
# spec.training


CLAIM_PATH_RULE = Rule(
    "!has(self.claimName) || has(self.path)",
    "checkpoint.claimName needs checkpoint.path (where the claim is mounted)",
    ".path",
)

NOT_PLAN_RULE = Rule(
    f"!has(self.path) || !(self.path == '{PLAN_MOUNT}' || "
    f"self.path.startsWith('{PLAN_MOUNT}/'))",
    f"checkpoint.path may not be under {PLAN_MOUNT} (the read-only plan volume)",
    ".path",
)

NOT_SCRATCH_RULE = Rule(
    f"!has(self.claimName) || !has(self.path) || self.path != '{SCRATCH_MOUNT}'",
    f"checkpoint.path {SCRATCH_MOUNT} is the scratch volume's mount point: mount the claim "
    "elsewhere or below it",
    ".path",
)

class CheckpointSpec(_Spec):
    """Where and how often workers save the plan-independent checkpoint (by global layer
    index), from which a restarted or re-planned job resumes."""

    model_config = ConfigDict(
        json_schema_extra=_cel(CLAIM_PATH_RULE, NOT_PLAN_RULE, NOT_SCRATCH_RULE)
    )

    path: str | None = Field(
        None,
        max_length=4096,
        pattern=ABSOLUTE_PATH,
        description="Absolute directory inside the worker containers; unset disables "
        "checkpoints (a restart then begins at step 0).",
    )
    interval_steps: int = Field(
        100, ge=1, le=MAX_STEPS, description="Save every this many optimizer steps."
    )
    claim_name: DnsSubdomain | None = Field(
        None,
        description="PersistentVolumeClaim mounted at `path` in every worker (it must be "
        "reachable from every planned node, e.g. ReadWriteMany).",
    )

    @model_validator(mode="after")
    def _mount(self) -> CheckpointSpec:
        if self.claim_name is not None and self.path is None:
            raise CLAIM_PATH_RULE.error()
        if self.path is not None and (
            self.path == PLAN_MOUNT or self.path.startswith(PLAN_MOUNT + "/")
        ):
            raise NOT_PLAN_RULE.error()
        if self.claim_name is not None and self.path == SCRATCH_MOUNT:
            raise NOT_SCRATCH_RULE.error()
        return self


class DataSpec(_Spec):
    """Training data."""

    corpus: str = Field(
        "stdlib",
        min_length=1,
        max_length=4096,
        description="Text corpus of the byte-level language models: `stdlib` (the Python "
        "standard library's source, present in every image) or a path inside the workers. "
        "Image and vector models use a deterministic generated dataset.",
    )


WARMUP_RULE = Rule(
    "self.warmupSteps <= self.steps",
    "training.warmupSteps must be <= training.steps",
    ".warmupSteps",
)

class TrainingSpec(_Spec):
    """How to train: batch, steps, optimizer, precision, checkpoints, data."""

    model_config = ConfigDict(json_schema_extra=_cel(WARMUP_RULE))

    global_batch: int = Field(
        32, ge=1, le=1_048_576, description="Samples per optimizer step, over all devices."
    )
    steps: int = Field(1000, ge=1, le=MAX_STEPS, description="Optimizer steps to train.")
    optimizer: Literal["adamw"] = Field("adamw", description="Optimizer.")
    learning_rate: float = Field(
        3e-4, gt=0, le=MAX_LEARNING_RATE, description="Peak learning rate."
    )
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW decoupled weight decay.")
    warmup_steps: int = Field(
        0, ge=0, le=MAX_STEPS, description="Linear learning-rate warm-up steps."
    )
    grad_clip_norm: float = Field(
        1.0,
        ge=0,
        le=1e6,
        description="Clip the global gradient norm to this; 0 disables clipping.",
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed for initialisation and data sampling."
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Compute precision (bf16 halves activation and weight bytes)."
    )
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, json_schema_extra=_default_of(CheckpointSpec)
    )
    data: DataSpec = Field(default_factory=DataSpec, json_schema_extra=_default_of(DataSpec))

    @model_validator(mode="after")
    def _warmup(self) -> TrainingSpec:
        if self.warmup_steps > self.steps:
            raise WARMUP_RULE.error(f"{self.warmup_steps} > {self.steps}")
        return self


# ---------------------------------------------------------------------------------------------
# spec.planner: PlannerOptions minus globalBatch (which is training.globalBatch)


def _option(name: str) -> Any:
    """A copy of a ``PlannerOptions`` field (same type bounds, default and description)."""
    return copy.copy(PlannerOptions.model_fields[name])


#: ``spec.planner`` fields that steer the running job, not the planner's search.
RUNTIME_PLANNER_FIELDS = frozenset({"adapt"})


class PlannerSpec(_Spec):
    """Planner knobs (the same as `spantrain plan`'s); the global batch is training.globalBatch."""

    schedule: ScheduleChoice = _option("schedule")
    num_microbatches: int | None = _option("num_microbatches")
    network_cut_ratio: float = _option("network_cut_ratio")
    compute_tolerance: float = _option("compute_tolerance")
    allow_exclusion: bool = _option("allow_exclusion")
    max_stages: int | None = _option("max_stages")
    adapt: AdaptMode = Field(
        DEFAULT_ADAPT,
        description="While the job runs: `off`; `rebalance` (when a device's measured speed "
        "departs from the plan's for a sustained window, re-balance sample shares inside its "
        "stage in place, no restart); `replan` (also re-plan layers through the checkpoint "
        "when the predicted gain pays for the restart).",
    )


# ---------------------------------------------------------------------------------------------
# spec.placement


MATCH_VALUES_RULE = Rule(
    "self.operator in ['Exists', 'DoesNotExist'] ? "
    "!has(self.values) || size(self.values) == 0 : "
    "(self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 : "
    "has(self.values) && size(self.values) == 1 && "
    f"self.values[0].matches({_re('^-?[0-9]{1,18}$')}))",
    "values must be empty for Exists/DoesNotExist, non-empty for In/NotIn and one integer "
    "for Gt/Lt",
    ".values",
)

class NodeSelectorRequirement(_Spec):
    """A node label requirement, as in a Pod's node affinity."""

    model_config = ConfigDict(json_schema_extra=_cel(MATCH_VALUES_RULE))

    key: LabelKey = Field(description="Node label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(
        description="How the label's value is compared with `values`."
    )
    values: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list,
        max_length=64,
        description="Values for In/NotIn (one or more), Gt/Lt (one integer).",
    )

    @model_validator(mode="after")
    def _values(self) -> NodeSelectorRequirement:
        n = len(self.values)
        ok = {"Exists": n == 0, "DoesNotExist": n == 0, "In": n > 0, "NotIn": n > 0}.get(
            self.operator, n == 1 and re.fullmatch(r"-?[0-9]{1,18}", self.values[0]) is not None
        )
        if not ok:
            raise MATCH_VALUES_RULE.error(
                f"key {self.key}: operator {self.operator} does not take {self.values}"
            )
        return self


TOLERATION_SECONDS_RULE = Rule(
    "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
    "tolerationSeconds needs effect NoExecute",
    ".tolerationSeconds",
)

EXISTS_VALUE_RULE = Rule(
    "self.operator != 'Exists' || !has(self.value) || self.value == ''",
    "value must be empty with operator Exists",
    ".value",
)

EMPTY_KEY_RULE = Rule(
    "self.operator == 'Exists' || has(self.key)",
    "operator must be Exists when key is unset (which tolerates every taint)",
    ".operator",
)

class Toleration(_Spec):
    """A toleration added to every worker pod (as in a Pod spec)."""

    model_config = ConfigDict(
        json_schema_extra=_cel(TOLERATION_SECONDS_RULE, EXISTS_VALUE_RULE, EMPTY_KEY_RULE)
    )

    key: LabelKey | None = Field(None, description="Taint key; unset matches all (with Exists).")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: LabelValue | None = Field(None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty matches all."
    )
    toleration_seconds: int | None = Field(
        None,
        ge=0,
        le=31_536_000,
        description="How long a NoExecute taint is tolerated before eviction.",
    )

    @model_validator(mode="after")
    def _combination(self) -> Toleration:
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise TOLERATION_SECONDS_RULE.error(f"effect is {self.effect}")
        if self.operator == "Exists" and self.value:
            raise EXISTS_VALUE_RULE.error()
        if self.operator != "Exists" and self.key is None:
            raise EMPTY_KEY_RULE.error()
        return self


NODE_SELECTOR_KEYS_RULE = Rule(
    f"self.all(k, k.size() <= 317 && k.matches({_re(QUALIFIED_NAME)}) && k.indexOf('/') <= 253)",
    "nodeSelector keys must be label keys: [prefix/]name, name at most 63 characters of "
    "[-A-Za-z0-9_.] (alphanumeric at both ends), prefix a DNS subdomain",
)


def _is_label_key(key: str) -> bool:
    return len(key) <= 317 and re.fullmatch(QUALIFIED_NAME, key) is not None and (
        key.find("/") <= 253
    )


class PlacementSpec(_Spec):
    """Which nodes may host workers. The operator reads every Ready, schedulable node that
    matches, and the planner chooses among their devices."""

    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Node labels that must all match.",
        json_schema_extra=_cel(NODE_SELECTOR_KEYS_RULE),
    )
    match_expressions: list[NodeSelectorRequirement] = Field(
        default_factory=list,
        max_length=32,
        description="Further node label requirements (all must hold).",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations for every worker pod."
    )
    tolerate_node_taints: bool = Field(
        True,
        description="Consider tainted nodes (e.g. KubeEdge's node-role.kubernetes.io/edge "
        "NoSchedule) and give each worker tolerations for its own node's taints.",
    )
    max_devices: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Use at most this many devices (the fastest ones).",
    )

    @field_validator("node_selector")
    @classmethod
    def _selector_keys(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not _is_label_key(k)]
        if bad:
            raise NODE_SELECTOR_KEYS_RULE.error(f"got {', '.join(map(repr, bad))}")
        return value


# ---------------------------------------------------------------------------------------------
# spec.resources, rendezvous, policies, scheduling

RESOURCE_NAMES_RULE = Rule(
    f"self.all(k, k.matches({_re(RESOURCE_NAME)}))",
    "resource names are cpu, memory, ephemeral-storage, hugepages-<size> or a domain-prefixed "
    "extended resource such as nvidia.com/gpu",
)


def _le_quantity(request: int | str, limit: int | str) -> bool:
    a, b = quantity_value(str(request)), quantity_value(str(limit))
    return a is None or b is None or a <= b


# (no isQuantity guards: the API server's cost estimate would exceed its budget; a value that
# is no quantity is rejected at its own path anyway, with one more message here)
REQUESTS_LE_LIMITS_RULE = Rule(
    "!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || "
    "quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
    "a resource request may not exceed its limit",
    ".requests",
)

class ResourcesSpec(_Spec):
    """Compute resources of every worker container. GPU workers also get nvidia.com/gpu: 1."""

    model_config = ConfigDict(json_schema_extra=_cel(REQUESTS_LE_LIMITS_RULE))

    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=MAX_RESOURCES,
        description="Requests, e.g. {cpu: '2', memory: 4Gi}.",
        json_schema_extra=_cel(RESOURCE_NAMES_RULE),
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=MAX_RESOURCES,
        description="Limits, e.g. {memory: 8Gi}.",
        json_schema_extra=_cel(RESOURCE_NAMES_RULE),
    )

    @field_validator("requests", "limits")
    @classmethod
    def _names(cls, value: dict[str, int | str]) -> dict[str, int | str]:
        bad = [k for k in value if re.fullmatch(RESOURCE_NAME, k) is None]
        if bad:
            raise RESOURCE_NAMES_RULE.error(f"got {', '.join(map(repr, bad))}")
        return value

    @model_validator(mode="after")
    def _within_limits(self) -> ResourcesSpec:
        over = [
            k for k, v in self.requests.items()
            if k in self.limits and not _le_quantity(v, self.limits[k])
        ]
        if over:
            raise REQUESTS_LE_LIMITS_RULE.error(", ".join(over))
        return self


RESERVED_ENV_RULE = Rule(
    f"!self.name.startsWith('{contract.PREFIX}') && !(self.name in "
    + str(list(RESERVED_ENV)).replace('"', "'")
    + ")",
    "env name is reserved: the operator sets MASTER_*, WORLD_SIZE, RANK, LOCAL_RANK, PET_* and "
    f"{contract.PREFIX}*",
)


class EnvVar(_Spec):
    """An extra environment variable for every worker."""

    model_config = ConfigDict(json_schema_extra=_cel(RESERVED_ENV_RULE))

    name: str = Field(
        max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name."
    )
    value: str = Field("", max_length=32768, description="Variable value.")

    @model_validator(mode="after")
    def _not_reserved(self) -> EnvVar:
        if self.name.startswith(contract.PREFIX) or self.name in RESERVED_ENV:
            raise RESERVED_ENV_RULE.error(self.name)
        return self




class RendezvousSpec(_Spec):
    """How workers find rank 0 (the c10d store) and each other."""

    port: int = Field(29500, ge=1024, le=65535, description="Rendezvous (c10d store) port.")
    address_mode: Literal["auto", "dns", "ip", "hostNetwork"] = Field(
        "auto",
        description="dns: rank 0's name in the job's headless Service; ip: rank 0's pod IP "
        "(workers are created once rank 0 has one); hostNetwork: pods on the host network, "
        "rank 0's node InternalIP. auto, per pod: pods on KubeEdge edge nodes on the host "
        "network (EdgeMesh does not resolve headless Services reliably), the others on dns; "
        "rank 0 is found by its DNS name, or by its node's InternalIP when it is on an edge "
        "node.",
    )


class FailurePolicy(_Spec):
    """What happens when a worker fails or a node goes away. A pipeline cannot run with a
    stage missing, so any failure restarts the whole job from its last checkpoint."""

    max_restarts: int = Field(
        3,
        ge=0,
        le=1000,
        description="Restarts after worker failures before the job is Failed (like backoffLimit).",
    )
    node_lost_grace_period_seconds: int = Field(
        300,
        ge=0,
        le=86400,
        description="A node NotReady this long (or deleted) counts as lost; its workers "
        "tolerate not-ready/unreachable taints this long.",
    )
    replan_on_node_loss: bool = Field(
        True,
        description="On a lost node, re-plan on the remaining nodes and restart from the "
        "checkpoint (does not count against maxRestarts); otherwise treat it as a failure.",
    )


class RunPolicy(_Spec):
    """Lifetime of the job and its pods (PyTorchJob's words)."""

    clean_pod_policy: Literal["All", "Running", "None"] = Field(
        "Running",
        description="Pods deleted when the job finishes: All, Running (those still running) "
        "or None.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=31_536_000,
        description="Delete the finished job (and its pods) after this many seconds.",
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        le=31_536_000,
        description="Fail the job (reason DeadlineExceeded) this long after it started. Immutable.",
    )


VOLCANO_SCHEDULER_RULE = Rule(
    "self.gang != 'volcano' || !has(self.schedulerName) || self.schedulerName == 'volcano'",
    "scheduling.gang volcano needs schedulerName volcano (or unset)",
    ".schedulerName",
)


class SchedulingSpec(_Spec):
    """Scheduler and gang scheduling for the worker pods."""

    model_config = ConfigDict(json_schema_extra=_cel(VOLCANO_SCHEDULER_RULE))

    scheduler_name: DnsSubdomain | None = Field(
        None, description="schedulerName of the worker pods."
    )
    gang: Literal["none", "volcano", "coscheduling"] = Field(
        "none",
        description="Gang scheduling: volcano (a Volcano PodGroup, minMember = all workers), "
        "coscheduling (a scheduler-plugins PodGroup) or none.",
    )
    queue: DnsSubdomain | None = Field(None, description="Volcano queue.")
    priority_class_name: DnsSubdomain | None = Field(
        None, description="priorityClassName of the worker pods."
    )
    schedule_timeout_seconds: int = Field(
        300, ge=1, le=86400, description="PodGroup schedule timeout (coscheduling)."
    )

    @model_validator(mode="after")
    def _volcano(self) -> SchedulingSpec:
        if self.gang == "volcano" and self.scheduler_name not in (None, "volcano"):
            raise VOLCANO_SCHEDULER_RULE.error(f"got {self.scheduler_name}")
        return self


# ---------------------------------------------------------------------------------------------
# spec


# transition rules (oldSelf): the API server checks them on updates; pydantic, which sees one
# object at a time, has nothing to compare with
MODEL_IMMUTABLE_RULE = Rule("self.model == oldSelf.model", "model is immutable", ".model")
DEADLINE_IMMUTABLE_RULE = Rule(
    "has(self.runPolicy.activeDeadlineSeconds) == has(oldSelf.runPolicy.activeDeadlineSeconds) "
    "&& (!has(self.runPolicy.activeDeadlineSeconds) || "
    "self.runPolicy.activeDeadlineSeconds == oldSelf.runPolicy.activeDeadlineSeconds)",
    "runPolicy.activeDeadlineSeconds is immutable",
    ".runPolicy.activeDeadlineSeconds",
)
MICROBATCHES_RULE = Rule(
    "!has(self.planner.numMicrobatches) || "
    "self.planner.numMicrobatches <= self.training.globalBatch",
    "planner.numMicrobatches must be <= training.globalBatch",
    ".planner.numMicrobatches",
)
IMAGES_KEYS_RULE = Rule(
    f"self.all(k, k in {list(ARCHITECTURES)})".replace('"', "'"),
    f"images keys are kubernetes.io/arch values: {', '.join(ARCHITECTURES)}",
)


class SpanTrainJobSpec(_Spec):
    """Desired state of a SpanTrainJob: what to train and where it may run. The operator plans
    the pipeline (stages, devices, shares, schedule) from the nodes it finds."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            MODEL_IMMUTABLE_RULE, DEADLINE_IMMUTABLE_RULE, MICROBATCHES_RULE
        )
    )

    model: ModelSpec
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, json_schema_extra=_default_of(TrainingSpec)
    )
    planner: PlannerSpec = Field(
        default_factory=PlannerSpec, json_schema_extra=_default_of(PlannerSpec)
    )
    placement: PlacementSpec = Field(
        default_factory=PlacementSpec, json_schema_extra=_default_of(PlacementSpec)
    )
    image: ImageRef | None = Field(
        None,
        description="Worker image reference (defaults to the operator's configured image).",
    )
    images: dict[str, ImageRef] = Field(
        default_factory=dict,
        max_length=len(ARCHITECTURES),
        description="Per-architecture worker images keyed by kubernetes.io/arch "
        f"({', '.join(ARCHITECTURES)}); they override `image` on nodes of that architecture.",
        json_schema_extra=_cel(IMAGES_KEYS_RULE),
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="imagePullPolicy of the worker containers."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, json_schema_extra=_default_of(ResourcesSpec)
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description="Extra environment for every worker (names unique).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    rendezvous: RendezvousSpec = Field(
        default_factory=RendezvousSpec, json_schema_extra=_default_of(RendezvousSpec)
    )
    failure_policy: FailurePolicy = Field(
        default_factory=FailurePolicy, json_schema_extra=_default_of(FailurePolicy)
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy, json_schema_extra=_default_of(RunPolicy)
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec, json_schema_extra=_default_of(SchedulingSpec)
    )
    suspend: bool = Field(
        False,
        description="Suspend the job: its pods are deleted, its plan is kept; unsuspending "
        "recreates them and resumes from the checkpoint.",
    )
    service_account_name: DnsSubdomain | None = Field(
        None, description="serviceAccountName of the worker pods."
    )

    @field_validator("env")
    @classmethod
    def _unique_env(cls, value: list[EnvVar]) -> list[EnvVar]:
        seen: set[str] = set()
        for i, var in enumerate(value):
            if var.name in seen:
                # the API server's list-map check (x-kubernetes-list-map-keys: [name])
                raise _invalid(f"[{i}]", f"duplicate env name {var.name}")
            seen.add(var.name)
        return value

    @field_validator("images")
    @classmethod
    def _architectures(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if k not in ARCHITECTURES]
        if bad:
            raise IMAGES_KEYS_RULE.error(f"got {', '.join(map(repr, bad))}")
        return value

    @model_validator(mode="after")
    def _microbatches(self) -> SpanTrainJobSpec:
        nmb = self.planner.num_microbatches
        if nmb is not None and nmb > self.training.global_batch:
            raise MICROBATCHES_RULE.error(f"{nmb} > {self.training.global_batch}")
        return self


# ---------------------------------------------------------------------------------------------
# status

Phase = Literal["Pending", "Planned", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


class JobPhase(StrEnum):
    """``status.phase`` (the values of ``Phase``)."""

    PENDING = "Pending"
    PLANNED = "Planned"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


PHASES: tuple[str, ...] = tuple(JobPhase)
assert get_args(Phase) == PHASES
TERMINAL_PHASES = (JobPhase.SUCCEEDED, JobPhase.FAILED)


class JobCondition(StrEnum):
    """``status.conditions[].type``."""

    PLANNED = "Planned"
    RUNNING = "Running"
    DEGRADED = "Degraded"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


CONDITION_TYPES: tuple[str, ...] = tuple(JobCondition)


class Reason(StrEnum):
    """CamelCase reasons of phases, conditions and events (``status.reason``, ``kubectl get
    events``): what a user greps for, so each is spelled here once."""

    # a job that cannot run
    INVALID_SPEC = "InvalidSpec"  # the spec, or an object it renders, is refused
    PLAN_INFEASIBLE = "PlanInfeasible"  # no plan fits the devices' memory
    PLAN_TIMEOUT = "PlanTimeout"  # the planner's time budget ran out
    NO_ELIGIBLE_NODES = "NoEligibleNodes"  # waiting for a node the placement selects
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    MAX_RESTARTS_EXCEEDED = "MaxRestartsExceeded"
    # planning
    INITIAL = "Initial"
    PLAN_COMPUTED = "PlanComputed"
    NODE_LOST = "NodeLost"
    SPEC_CHANGED = "SpecChanged"
    PLAN_LOST = "PlanLost"
    REPLANNING = "Replanning"
    # workers
    CREATING_WORKERS = "CreatingWorkers"
    STAGE_POD_CREATED = "StagePodCreated"
    STAGE_POD_FAILED = "StagePodFailed"
    WORKERS_NOT_READY = "WorkersNotReady"
    ALL_WORKERS_RUNNING = "AllWorkersRunning"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    SUCCEEDED = "Succeeded"
    # the dynamic adapter
    REBALANCED = "Rebalanced"  # shares inside stages changed in place
    REPLANNED = "Replanned"  # layers moved through a checkpoint and restart
    # nodes
    NODE_NOT_READY = "NodeNotReady"
    NODES_READY = "NodesReady"


class Condition(_Status):
    """A condition in the style of metav1.Condition (KEP-1623)."""

    type: str = Field(
        max_length=316,
        pattern=CONDITION_TYPE_PATTERN,
        description="Planned, Running, Degraded, Succeeded, Failed or Suspended.",
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        None, ge=0, description="The .metadata.generation the condition was set from."
    )
    last_transition_time: str = Field(
        json_schema_extra={"format": "date-time"},
        description="When the status last changed.",
    )
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description="CamelCase reason.",
    )
    message: str = Field("", max_length=32768, description="Human-readable detail.")


class StageSummary(_Status):
    """One pipeline stage of the plan."""

    index: int = Field(ge=0, description="Stage index (0 = first layers).")
    layer_start: int = Field(ge=0, description="First layer (inclusive).")
    layer_end: int = Field(ge=1, description="Last layer (exclusive).")
    replicas: int = Field(ge=1, description="Devices (data-parallel width) of the stage.")
    nodes: list[str] = Field(default_factory=list, description="Nodes hosting the devices.")
    devices: list[str] = Field(default_factory=list, description="Device ids, in rank order.")
    ranks: list[int] = Field(default_factory=list, description="Global ranks.")
    shares: list[int] = Field(
        default_factory=list, description="Samples of every micro-batch per device."
    )


class PlanSummary(_Status):
    """What the planner decided (the full plan is plan.json in `configMap`)."""

    hash: str = Field(description="Content hash of plan.json.")
    config_map: str = Field(description="ConfigMap holding plan.json.")
    generation: int = Field(0, description="Spec generation the plan was computed for.")
    spec_hash: str | None = Field(
        None, description="Hash of the spec fields the plan depends on (a change re-plans)."
    )
    reason: str | None = Field(
        None, description="Why this plan was made: Initial, SpecChanged or NodeLost."
    )
    computed_at: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When it was computed."
    )
    strategy: str = Field("spantrain", description="Planner that produced it.")
    schedule: str = Field(description="Pipeline schedule: gpipe, 1f1b or zb.")
    num_stages: int = Field(ge=1, description="Pipeline stages.")
    num_devices: int = Field(ge=1, description="Workers (world size).")
    num_microbatches: int = Field(ge=1, description="Micro-batches per step.")
    microbatch_size: int = Field(ge=1, description="Samples per micro-batch.")
    num_excluded: int = Field(0, ge=0, description="Candidate devices left out.")
    predicted_step_seconds: float | None = Field(None, description="Simulated step time.")
    predicted_samples_per_second: float | None = Field(
        None, description="Simulated throughput (samples/s)."
    )
    bottleneck: str | None = Field(None, description="Slowest stage or link, in words.")
    nodes: list[str] = Field(default_factory=list, description="Every node the plan uses.")
    stages: list[StageSummary] = Field(
        default_factory=list, description="Pipeline stages, first layers first."
    )


class StageStatus(_Status):
    """Readiness of one stage's workers."""

    index: int = Field(ge=0, description="Stage index.")
    ready: int = Field(0, ge=0, description="Workers running and ready.")
    total: int = Field(0, ge=0, description="Workers of the stage.")
    failed: int = Field(0, ge=0, description="Workers failed.")


class Progress(_Status):
    """Training progress as reported by the workers."""

    step: int = Field(0, ge=0, description="Last completed optimizer step.")
    steps: int = Field(0, ge=0, description="Steps to train.")
    progress_percentage: int = Field(0, ge=0, le=100, description="step / steps, in percent.")
    loss: float | None = Field(None, description="Last reported training loss.")
    samples_per_second: float | None = Field(
        None, description="Measured throughput (samples/s), read from rank 0's metrics."
    )
    predicted_samples_per_second: float | None = Field(
        None, description="Throughput the current plan predicts (samples/s), beside the measured."
    )
    estimated_remaining_seconds: int | None = Field(None, ge=0, description="ETA.")
    last_updated_time: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When progress was read."
    )


#: Adaptations kept in a job's status (the newest).
MAX_ADAPTATIONS = 20


class Adaptation(_Status):
    """One change the dynamic adapter made to the running plan."""

    time: str = Field(json_schema_extra={"format": "date-time"},
                      description="When the operator saw it.")
    kind: Literal["rebalance", "replan"] = Field(
        description="rebalance: sample shares inside stages, in place; replan: layers moved "
        "through the checkpoint and a restart.")
    attempt: int = Field(ge=0, description="Pod generation it happened in.")
    step: int = Field(ge=0, description="First step trained under the change.")
    count: int = Field(1, ge=1, description="Adaptations this entry stands for (seen at once).")
    reason: str = Field(description="Why, in words.")
    predicted_gain: float | None = Field(
        None, description="Predicted step-time gain, old / new - 1, from the measured speeds.")
    measured_samples_per_second: float | None = Field(
        None, description="Throughput measured before the change.")
    predicted_samples_per_second: float | None = Field(
        None, description="Throughput predicted after it (measured x (1 + gain)).")


#: Measured links kept in a job's status.
MAX_MEASURED_LINKS = 64


class MeasuredLink(_Status):
    """A link speed the job's workers measured (a re-plan's reason): the planner uses it
    instead of the labels' for this job's later plans."""

    a: str = Field(description="Sending node.")
    b: str = Field(description="Receiving node.")
    bandwidth_mbps: float = Field(gt=0, description="Measured goodput, Mbit/s.")
    measured_at: str = Field(json_schema_extra={"format": "date-time"},
                             description="When the operator recorded it.")


class SpanTrainJobStatus(_Status):
    """Observed state of a SpanTrainJob, written by the operator."""

    observed_generation: int | None = Field(None, description="Last spec generation acted on.")
    phase: Phase = Field(
        "Pending",
        description="Pending, Planned, Running, Restarting, Suspended, Succeeded or Failed "
        "(for display; the conditions are authoritative).",
    )
    reason: str | None = Field(None, description="CamelCase reason of the last phase change.")
    message: str | None = Field(None, description="Detail of the last phase change.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Conditions keyed by type: Planned, Running, Degraded, Succeeded, Failed, "
        "Suspended.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    plan: PlanSummary | None = None
    stages: list[StageStatus] = Field(
        default_factory=list,
        description="Readiness of every stage's workers.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["index"],
        },
    )
    ready: str | None = Field(None, description="Ready workers / workers, e.g. 4/4.")
    attempt: int = Field(
        0,
        ge=0,
        description="Pod generation: bumped by every restart and re-plan (pod names carry it).",
    )
    restarts: int = Field(0, ge=0, description="Restarts after worker failures.")
    replans: int = Field(0, ge=0, description="Re-plans after lost nodes or slowed links.")
    start_time: str | None = Field(
        None,
        json_schema_extra={"format": "date-time"},
        description="When workers were first created (reset by suspension; the deadline "
        "counts from here).",
    )
    completion_time: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When the job finished."
    )
    progress: Progress | None = None
    adaptations: list[Adaptation] = Field(
        default_factory=list,
        max_length=MAX_ADAPTATIONS,
        description=f"The dynamic adapter's changes to the running plan, oldest first (the "
        f"last {MAX_ADAPTATIONS}).",
    )
    measured_links: list[MeasuredLink] = Field(
        default_factory=list,
        max_length=MAX_MEASURED_LINKS,
        description="Link speeds the workers measured when they asked for a re-plan; later "
        "plans of this job use them instead of the nodes' labels.",
    )


JOB_NAME_RULE = Rule(
    f"self.metadata.name.size() <= {MAX_JOB_NAME} && "
    f"self.metadata.name.matches('{JOB_NAME_PATTERN}')",
    f"metadata.name must be a lower-case RFC 1035 label of at most {MAX_JOB_NAME} characters "
    "(it names the job's Service and pods)",
    "metadata.name",
    # metadata has no declared properties in a CRD schema: no fieldPath there
    cel_field_path=False,
)


class SpanTrainJob(BaseModel):
    """A SpanTrainJob manifest (apiVersion, kind, metadata, spec, status)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True
    )

    api_version: Literal["spantrain.io/v1alpha1"] = "spantrain.io/v1alpha1"
    kind: Literal["SpanTrainJob"] = "SpanTrainJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: SpanTrainJobSpec
    status: SpanTrainJobStatus | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "job"))

    @model_validator(mode="after")
    def _name(self) -> SpanTrainJob:
        name = self.metadata.get("name")
        if name is not None and (
            not isinstance(name, str)
            or len(name) > MAX_JOB_NAME
            or not re.match(JOB_NAME_PATTERN, name)
        ):
            raise JOB_NAME_RULE.error(f"got {name!r}")
        return self


def parse_spec(data: dict[str, Any]) -> SpanTrainJobSpec:
    """Validate a spec dict (as the API server stores it) into the model. Fields go by
    their camelCase names only, as in the CRD (``global_batch`` is an unknown field)."""
    return SpanTrainJobSpec.model_validate(data, by_name=False)


def parse_job(data: dict[str, Any]) -> SpanTrainJob:
    """Validate a whole manifest (a dict) into the model, as ``parse_spec`` does a spec."""
    return SpanTrainJob.model_validate(data, by_name=False)


def error_path(error: ErrorDetails) -> str:
    """The Kubernetes field path of one pydantic error (``spec.env[1].name``): list indexes
    in brackets, union branch names dropped, and the field a :class:`Rule` names appended."""
    path = ""
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "[key]":
            path += f".{part}"
    field = str((error.get("ctx") or {}).get("field") or "")
    if field:
        path += field if field[0] in ".[" or not path else "." + field
    return path.lstrip(".")


def error_lines(err: ValidationError) -> list[str]:
    """One ``path: message`` line per error, with Kubernetes field paths, the way the API
    server reports the same manifest."""
    lines = []
    for error in err.errors():
        got = error.get("input")
        shown = f" (got {got!r})" if isinstance(got, str | int | float | bool) else ""
        if error["type"] in ("spantrain_rule", "spantrain_invalid", "missing", "extra_forbidden"):
            shown = ""
        lines.append(f"{error_path(error) or '<root>'}: {error['msg']}{shown}")
    return lines


def load_job(path: str | Path) -> SpanTrainJob:
    """Load and validate a SpanTrainJob manifest (YAML or JSON)."""
    data = load_document(path)
    try:
        return parse_job(data)
    except ValidationError as err:
        lines = "\n".join(f"  {line}" for line in error_lines(err))
        raise InputError(f"{path}: invalid SpanTrainJob:\n{lines}") from None


# ---------------------------------------------------------------------------------------------
# spec -> planner inputs


@dataclass(frozen=True)
class PlannerInputs:
    """What ``spantrain_planner.passes.search.make_plan`` needs besides the topology."""

    profile: ModelProfile
    options: PlannerOptions


def bytes_per_element(precision: str) -> int:
    """Bytes of one activation/weight element at a training precision."""
    return 2 if precision == "bf16" else 4


def model_profile(spec: SpanTrainJobSpec) -> ModelProfile:
    """The layer profile of the spec's model (analytic for built-ins, given for entry points)."""
    m = spec.model
    bpe = bytes_per_element(spec.training.precision)
    if m.preset is not None:
        if m.preset not in preset_names():
            raise InputError(
                f"model.preset {m.preset!r} is unknown; choose one of: {', '.join(preset_names())}"
            )
        profile = preset(m.preset, bpe)
    elif m.family is not None:
        try:
            config = {} if m.config is None else m.config.model_dump(exclude_none=True)
            profile = build_profile(m.family, m.name or m.family, config, bpe)
        except TypeError as err:
            raise InputError(f"model.config does not fit family {m.family}: {err}") from None
    else:
        if m.profile is None:
            raise InputError(
                f"model.entrypoint {m.entrypoint} needs model.profile; measure it with "
                "`spantrain profile` and paste the result under model.profile"
            )
        data = m.profile.model_dump(by_alias=True, exclude_none=True)
        data.pop("apiVersion", None)
        data.pop("kind", None)
        data.setdefault("name", m.name or str(m.entrypoint))
        data["family"] = "custom"
        data["entrypoint"] = m.entrypoint
        try:
            profile = ModelProfile.model_validate(data)
        except ValidationError as err:
            raise InputError(f"model.profile is not a valid profile:\n{err}") from None
    if m.name and profile.name != m.name:
        profile = profile.model_copy(update={"name": m.name})
    return profile


def planner_options(spec: SpanTrainJobSpec) -> PlannerOptions:
    """``PlannerOptions`` of a spec: the planner block plus training.globalBatch."""
    knobs = spec.planner.model_dump(exclude_none=True, exclude=set(RUNTIME_PLANNER_FIELDS))
    return PlannerOptions(global_batch=spec.training.global_batch, **knobs)


def planner_inputs(spec: SpanTrainJobSpec) -> PlannerInputs:
    """The model profile and planner options a spec asks for (pure; raises ``InputError``)."""
    return PlannerInputs(profile=model_profile(spec), options=planner_options(spec))
