"""Model profiles: what each layer of a model costs, per sample.

Role: the planner's view of a model — an ordered list of layers, each with forward FLOPs,
backward FLOPs split into input-gradient (B) and weight-gradient (W) parts, parameter count
and bytes, boundary activation bytes (what crosses a stage cut) and stashed activation bytes
(what must stay in memory until the backward pass). Profiles of the built-in families (GPT
decoder, ResNet-style CNN, MLP) are analytic; the worker builds the *same* layers in torch
from ``ModelProfile.family`` and ``ModelProfile.config`` and a test checks that parameter
counts and boundary sizes agree. User models are measured by the worker (``spantrain
profile``) and arrive here as a YAML/JSON file.

Layer granularity, shared with the worker (``spantrain_worker.models``):
  gpt:    [embed] + num_layers x [block] + [head]   (head = final LayerNorm + LM projection + loss)
  resnet: [stem] + sum(blocks) x [residual block] + [head]   (head = avgpool + linear + loss)
  mlp:    num_layers x [linear + ReLU] + [head]   (head = linear to classes + loss)

Pure: imports pydantic and planner modules only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel, to_snake

from spantrain_planner.core.errors import InputError
from spantrain_planner.inputs.cluster import load_document


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class LayerProfile(_Model):
    """Costs of one layer for ONE sample (multiply by the micro-batch share)."""

    name: str
    forward_flops: float = Field(ge=0, description="Forward FLOPs per sample.")
    backward_input_flops: float = Field(ge=0, description="B pass FLOPs per sample.")
    backward_weight_flops: float = Field(ge=0, description="W pass FLOPs per sample.")
    param_count: int = Field(ge=0, description="Trainable parameters.")
    param_bytes: int = Field(ge=0, description="Bytes of the trainable parameters.")
    output_bytes: int = Field(ge=0, description="Boundary activation bytes per sample.")
    stash_bytes: int = Field(ge=0, description="Activation bytes kept for backward per sample.")


class ModelProfile(_Model):
    """An ordered list of layer profiles plus how to build the model."""

    name: str
    family: Literal["gpt", "resnet", "mlp", "custom"] = "custom"
    config: dict[str, Any] = Field(default_factory=dict, description="Builder parameters.")
    entrypoint: str | None = Field(None, description="module:function for custom models.")
    bytes_per_element: int = Field(4, description="4 for fp32, 2 for bf16/fp16.")
    layers: list[LayerProfile] = Field(min_length=1)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def param_count(self) -> int:
        return sum(layer.param_count for layer in self.layers)

    @property
    def param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)


# --------------------------------------------------------------------------------------------
# GPT-style decoder (pre-LayerNorm, learned positions, untied head, GELU MLP of width 4d)


def gpt_profile(
    name: str,
    *,
    num_layers: int,
    d_model: int,
    num_heads: int,
    seq_len: int,
    vocab_size: int,
    bytes_per_element: int = 4,
) -> ModelProfile:
    """Analytic profile of the GPT decoder that ``spantrain_worker.models`` builds.

    Per block: LN(2d) + QKV(3d^2+3d) + proj(d^2+d) + LN(2d) + fc(4d^2+4d) + fc2(4d^2+d)
    = 12d^2 + 13d parameters; forward FLOPs 24*S*d^2 (matmuls) + 4*S^2*d (scores and mix).
    """
    if d_model % num_heads:
        raise InputError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    s, d, v, b = seq_len, d_model, vocab_size, bytes_per_element
    hidden = s * d * b
    embed_params = v * d + s * d
    block_params = 12 * d * d + 13 * d
    head_params = 2 * d + d * v
    attn = 4.0 * s * s * d
    mm = 24.0 * s * d * d
    layers = [
        LayerProfile(
            name="embed",
            forward_flops=2.0 * s * d,
            backward_input_flops=0.0,
            backward_weight_flops=2.0 * s * d,
            param_count=embed_params,
            param_bytes=embed_params * b,
            output_bytes=hidden,
            stash_bytes=s * 8,
        )
    ]
    for i in range(num_layers):
        layers.append(
            LayerProfile(
                name=f"block{i}",
                forward_flops=mm + attn,
                backward_input_flops=mm + 2 * attn,
                backward_weight_flops=mm,
                param_count=block_params,
                param_bytes=block_params * b,
                output_bytes=hidden,
                # inputs of each matmul/LN/GELU (~16 S*d elements) + softmax scores and
                # probabilities (2 per head per query-key pair)
                stash_bytes=(16 * s * d + 2 * num_heads * s * s) * b,
            )
        )
    layers.append(
        LayerProfile(
            name="head",
            forward_flops=2.0 * s * d * v,
            backward_input_flops=2.0 * s * d * v,
            backward_weight_flops=2.0 * s * d * v,
            param_count=head_params,
            param_bytes=head_params * b,
            output_bytes=s * v * b,
            stash_bytes=(2 * s * d + 2 * s * v) * b,
        )
    )
    config = {
        "numLayers": num_layers,
        "dModel": d_model,
        "numHeads": num_heads,
        "seqLen": seq_len,
        "vocabSize": vocab_size,
    }
    return ModelProfile(name=name, family="gpt", config=config, bytes_per_element=b, layers=layers)


# --------------------------------------------------------------------------------------------
# ResNet-style CNN (BatchNorm; basic or bottleneck residual blocks; one block = one layer)


def _conv(h: int, c_in: int, c_out: int, k: int, stride: int) -> tuple[int, float, int]:
    """(params, forward FLOPs, output spatial size) of a bias-free conv with 'same' padding."""
    h_out = (h + stride - 1) // stride
    params = c_in * c_out * k * k
    flops = 2.0 * h_out * h_out * c_in * c_out * k * k
    return params, flops, h_out


def resnet_profile(
    name: str,
    *,
    block: Literal["basic", "bottleneck"],
    stage_blocks: list[int],
    width: int,
    image_size: int,
    num_classes: int,
    bytes_per_element: int = 4,
) -> ModelProfile:
    """Analytic profile of the ResNet that ``spantrain_worker.models`` builds.

    Stem: 3x3 conv stride 1 (images <= 64 px) or 7x7 stride 2 + 3x3/2 max-pool, BN, ReLU.
    Stage i has ``stage_blocks[i]`` blocks with width ``width * 2**i``; the first block of
    stages 1+ has stride 2. A block whose input and output shapes differ has a 1x1 projection
    conv + BN. Bottleneck blocks expand by 4. Head: global average pool + linear (with bias).
    """
    b = bytes_per_element
    layers: list[LayerProfile] = []
    h = image_size
    small = image_size <= 64
    k_stem, s_stem = (3, 1) if small else (7, 2)
    p, f, h = _conv(h, 3, width, k_stem, s_stem)
    if not small:
        h = (h + 1) // 2
    p += 2 * width
    c = width
    out = h * h * c * b
    layers.append(
        LayerProfile(
            name="stem",
            forward_flops=f + 4.0 * h * h * c,
            backward_input_flops=0.0,
            backward_weight_flops=f,
            param_count=p,
            param_bytes=p * b,
            output_bytes=out,
            stash_bytes=3 * image_size * image_size * b + 3 * out,
        )
    )
    expansion = 4 if block == "bottleneck" else 1
    for stage, num_blocks in enumerate(stage_blocks):
        planes = width * 2**stage
        for j in range(num_blocks):
            stride = 2 if (stage > 0 and j == 0) else 1
            c_out = planes * expansion
            params = 0
            flops = 0.0
            stash = h * h * c * b
            if block == "basic":
                p1, f1, h1 = _conv(h, c, planes, 3, stride)
                p2, f2, _ = _conv(h1, planes, planes, 3, 1)
                params += p1 + p2 + 4 * planes
                flops += f1 + f2
                stash += 4 * h1 * h1 * planes * b
            else:
                p1, f1, _ = _conv(h, c, planes, 1, 1)
                p2, f2, h1 = _conv(h, planes, planes, 3, stride)
                p3, f3, _ = _conv(h1, planes, c_out, 1, 1)
                params += p1 + p2 + p3 + 4 * planes + 2 * c_out
                flops += f1 + f2 + f3
                stash += (3 * h * h * planes + 3 * h1 * h1 * planes + 3 * h1 * h1 * c_out) * b
            if stride != 1 or c != c_out:
                pd, fd, _ = _conv(h, c, c_out, 1, stride)
                params += pd + 2 * c_out
                flops += fd
            h, c = h1, c_out
            flops += 6.0 * h * h * c  # BN, ReLU, residual add
            layers.append(
                LayerProfile(
                    name=f"stage{stage}.block{j}",
                    forward_flops=flops,
                    backward_input_flops=flops,
                    backward_weight_flops=flops,
                    param_count=params,
                    param_bytes=params * b,
                    output_bytes=h * h * c * b,
                    stash_bytes=stash,
                )
            )
    head_params = c * num_classes + num_classes
    layers.append(
        LayerProfile(
            name="head",
            forward_flops=float(h * h * c + 2 * c * num_classes),
            backward_input_flops=float(h * h * c + 2 * c * num_classes),
            backward_weight_flops=float(2 * c * num_classes),
            param_count=head_params,
            param_bytes=head_params * b,
            output_bytes=num_classes * b,
            stash_bytes=(h * h * c + c + num_classes) * b,
        )
    )
    config = {
        "block": block,
        "stageBlocks": list(stage_blocks),
        "width": width,
        "imageSize": image_size,
        "numClasses": num_classes,
    }
    return ModelProfile(
        name=name, family="resnet", config=config, bytes_per_element=b, layers=layers
    )


# --------------------------------------------------------------------------------------------
# MLP (Linear + ReLU layers, then a linear classifier head)


def mlp_profile(
    name: str,
    *,
    in_features: int,
    hidden: int,
    num_layers: int,
    num_classes: int,
    bytes_per_element: int = 4,
) -> ModelProfile:
    """Analytic profile of the MLP that ``spantrain_worker.models`` builds."""
    b = bytes_per_element
    layers: list[LayerProfile] = []
    width = in_features
    for i in range(num_layers):
        params = width * hidden + hidden
        flops = 2.0 * width * hidden
        layers.append(
            LayerProfile(
                name=f"fc{i}",
                forward_flops=flops + hidden,
                backward_input_flops=flops if i > 0 else 0.0,
                backward_weight_flops=flops,
                param_count=params,
                param_bytes=params * b,
                output_bytes=hidden * b,
                stash_bytes=(width + hidden) * b,
            )
        )
        width = hidden
    params = width * num_classes + num_classes
    layers.append(
        LayerProfile(
            name="head",
            forward_flops=2.0 * width * num_classes,
            backward_input_flops=2.0 * width * num_classes,
            backward_weight_flops=2.0 * width * num_classes,
            param_count=params,
            param_bytes=params * b,
            output_bytes=num_classes * b,
            stash_bytes=(width + num_classes) * b,
        )
    )
    config = {
        "inFeatures": in_features,
        "hidden": hidden,
        "numLayers": num_layers,
        "numClasses": num_classes,
    }
    return ModelProfile(name=name, family="mlp", config=config, bytes_per_element=b, layers=layers)


# --------------------------------------------------------------------------------------------
# Presets

_PRESETS: dict[str, dict[str, Any]] = {
    # tests and the local demo (train on 2 CPU cores)
    "gpt-tiny": {
        "family": "gpt",
        "num_layers": 2,
        "d_model": 32,
        "num_heads": 2,
        "seq_len": 16,
        "vocab_size": 256,
    },
    "gpt-mini": {
        "family": "gpt",
        "num_layers": 6,
        "d_model": 128,
        "num_heads": 4,
        "seq_len": 64,
        "vocab_size": 256,
    },
    "gpt-small-local": {
        "family": "gpt",
        "num_layers": 8,
        "d_model": 192,
        "num_heads": 6,
        "seq_len": 128,
        "vocab_size": 256,
    },
    "mlp-tiny": {
        "family": "mlp",
        "in_features": 16,
        "hidden": 32,
        "num_layers": 4,
        "num_classes": 10,
    },
    "resnet-tiny": {
        "family": "resnet",
        "block": "basic",
        "stage_blocks": [1, 1, 1],
        "width": 8,
        "image_size": 16,
        "num_classes": 10,
    },
    # the paper's workloads (planning; CIFAR-10-sized inputs for the CNN as in its plan)
    "resnet18": {
        "family": "resnet",
        "block": "basic",
        "stage_blocks": [2, 2, 2, 2],
        "width": 64,
        "image_size": 32,
        "num_classes": 10,
    },
    "resnet50": {
        "family": "resnet",
        "block": "bottleneck",
        "stage_blocks": [3, 4, 6, 3],
        "width": 64,
        "image_size": 32,
        "num_classes": 10,
    },
    "resnet50-imagenet": {
        "family": "resnet",
        "block": "bottleneck",
        "stage_blocks": [3, 4, 6, 3],
        "width": 64,
        "image_size": 224,
        "num_classes": 1000,
    },
    "bert-small": {
        "family": "gpt",
        "num_layers": 4,
        "d_model": 512,
        "num_heads": 8,
        "seq_len": 128,
        "vocab_size": 30522,
    },
    "gpt2-small": {
        "family": "gpt",
        "num_layers": 12,
        "d_model": 768,
        "num_heads": 12,
        "seq_len": 1024,
        "vocab_size": 50257,
    },
    "gpt2-medium": {
        "family": "gpt",
        "num_layers": 24,
        "d_model": 1024,
        "num_heads": 16,
        "seq_len": 1024,
        "vocab_size": 50257,
    },
}


def preset_names() -> list[str]:
    """Names of the built-in model presets."""
    return sorted(_PRESETS)


def build_profile(
    family: str, name: str, config: dict[str, Any], bytes_per_element: int = 4
) -> ModelProfile:
    """Build a built-in family's profile from its parameters (camelCase or snake_case keys)."""
    kwargs = {to_snake(key): value for key, value in config.items()}
    if family == "gpt":
        return gpt_profile(name, bytes_per_element=bytes_per_element, **kwargs)
    if family == "resnet":
        return resnet_profile(name, bytes_per_element=bytes_per_element, **kwargs)
    if family == "mlp":
        return mlp_profile(name, bytes_per_element=bytes_per_element, **kwargs)
    raise InputError(f"unknown model family {family!r}; use gpt, resnet or mlp")


def preset(name: str, bytes_per_element: int = 4) -> ModelProfile:
    """The profile of a named preset (see ``preset_names()``)."""
    if name not in _PRESETS:
        raise InputError(
            f"unknown model preset {name!r}; choose one of: {', '.join(preset_names())}, "
            "or give a profile file (.yaml/.json)"
        )
    params = dict(_PRESETS[name])
    family = params.pop("family")
    return build_profile(family, name, params, bytes_per_element)


def load_profile(path: str | Path) -> ModelProfile:
    """Load a model profile file (as written by ``spantrain profile``)."""
    data = load_document(path)
    data.pop("apiVersion", None)
    data.pop("kind", None)
    try:
        return ModelProfile.model_validate(data)
    except ValueError as err:
        raise InputError(f"{path}: invalid model profile:\n{err}") from None


def get_profile(name_or_path: str, bytes_per_element: int = 4) -> ModelProfile:
    """A preset by name, or a profile file by path."""
    if name_or_path.endswith((".yaml", ".yml", ".json")) or "/" in name_or_path:
        return load_profile(name_or_path)
    return preset(name_or_path, bytes_per_element)
