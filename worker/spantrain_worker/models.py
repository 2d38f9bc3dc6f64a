"""Built-in models as ordered layer lists, and user models from an entry point.

Role: turn a plan's ``ModelRef`` (family + config, or ``module:function``) into the list of
``nn.Module`` layers the planner's profile describes, one module per profiled layer, plus the
loss function and the dataset. The layer granularity is the planner's
(``spantrain_planner.inputs.profiles``):

  gpt:    [embed] + num_layers x [block] + [head]     head = final LayerNorm + LM projection
  resnet: [stem] + sum(stage_blocks) x [block] + [head]   head = avgpool + linear
  mlp:    num_layers x [linear + ReLU] + [head]       head = linear to classes

The last layer outputs logits; ``loss_fn(logits, labels)`` is the mean loss over its rows.
Every layer is initialised from its own seed ``layer_seed(seed, index)``, so a rank that builds
only its stage gets exactly the weights a single process building the whole model gets, under
any plan. Called by the runtime, the baseline loop, the benchmark and the tests.

Must not import torch.distributed, kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from pydantic.alias_generators import to_snake
from torch import Tensor, nn

from spantrain_planner.inputs.plan import ModelRef

from .data import Dataset, ImageDataset, LMDataset, SyntheticDataset

LossFn = Callable[[Tensor, Tensor], Tensor]


class ModelError(ValueError):
    """A model reference that cannot be built; the message names the knob."""


def layer_seed(seed: int, index: int) -> int:
    """Initialisation seed of global layer ``index`` (plan-independent)."""
    digest = hashlib.blake2b(f"{seed}:layer:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------------------------
# GPT decoder (pre-LayerNorm, learned positions, untied head, GELU MLP of width 4d)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, d_model: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(seq_len, d_model)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        out: Tensor = self.tokens(idx) + self.positions(pos)
        return out


class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(b, s, h, d // h).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        out: Tensor = x + self.fc2(F.gelu(self.fc(self.ln2(x))))
        return out


class LMHead(nn.Module):
    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.proj(self.ln(x))
        return out


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token cross-entropy over all rows and positions."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def class_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the rows."""
    return F.cross_entropy(logits, labels)


def _gpt_layer(cfg: dict[str, Any], index: int) -> nn.Module:
    n = cfg["num_layers"]
    if index == 0:
        return Embedding(cfg["vocab_size"], cfg["seq_len"], cfg["d_model"])
    if index <= n:
        return Block(cfg["d_model"], cfg["num_heads"])
    return LMHead(cfg["d_model"], cfg["vocab_size"])


# --------------------------------------------------------------------------------------------
# ResNet-style CNN


def _conv(c_in: int, c_out: int, k: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)


class Stem(nn.Module):
    def __init__(self, width: int, image_size: int) -> None:
        super().__init__()
        small = image_size <= 64
        self.conv = _conv(3, width, 3, 1) if small else _conv(3, width, 7, 2)
        self.bn = nn.BatchNorm2d(width)
        self.pool: nn.Module = nn.Identity() if small else nn.MaxPool2d(3, 2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.pool(F.relu(self.bn(self.conv(x))))
        return out


class ResidualBlock(nn.Module):
    def __init__(self, kind: str, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        expansion = 4 if kind == "bottleneck" else 1
        c_out = planes * expansion
        if kind == "basic":
            self.body = nn.Sequential(
                _conv(c_in, planes, 3, stride), nn.BatchNorm2d(planes), nn.ReLU(),
                _conv(planes, planes, 3, 1), nn.BatchNorm2d(planes),
            )
        else:
            self.body = nn.Sequential(
                _conv(c_in, planes, 1, 1), nn.BatchNorm2d(planes), nn.ReLU(),
                _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes), nn.ReLU(),
                _conv(planes, c_out, 1, 1), nn.BatchNorm2d(c_out),
            )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ClassifierHead(nn.Module):
    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(x.mean(dim=(2, 3)))
        return out


def _resnet_blocks(cfg: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(c_in, planes, stride) of every residual block, in order."""
    expansion = 4 if cfg["block"] == "bottleneck" else 1
    blocks = []
    c = cfg["width"]
    for stage, num_blocks in enumerate(cfg["stage_blocks"]):
        planes = cfg["width"] * 2**stage
        for j in range(num_blocks):
            blocks.append((c, planes, 2 if (stage > 0 and j == 0) else 1))
            c = planes * expansion
    return blocks


def _resnet_layer(cfg: dict[str, Any], index: int) -> nn.Module:
    blocks = _resnet_blocks(cfg)
    if index == 0:
        return Stem(cfg["width"], cfg["image_size"])
    if index <= len(blocks):
        c_in, planes, stride = blocks[index - 1]
        return ResidualBlock(cfg["block"], c_in, planes, stride)
    expansion = 4 if cfg["block"] == "bottleneck" else 1
    return ClassifierHead(blocks[-1][1] * expansion, cfg["num_classes"])


# --------------------------------------------------------------------------------------------
# MLP


class Dense(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, c_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(x))


def _mlp_layer(cfg: dict[str, Any], index: int) -> nn.Module:
    if index < cfg["num_layers"]:
        return Dense(cfg["in_features"] if index == 0 else cfg["hidden"], cfg["hidden"])
    return nn.Sequential(nn.Linear(cfg["hidden"], cfg["num_classes"]))


# --------------------------------------------------------------------------------------------
# Building


@dataclass
class BuiltModel:
    """Some (or all) layers of a model, keyed by global layer index, plus loss and data."""

    layers: dict[int, nn.Module]
    num_layers: int
    loss_fn: LossFn
    dataset: Dataset | None  # None when built with ``with_data=False``

    def stage(self, start: int, end: int) -> list[nn.Module]:
        return [self.layers[i] for i in range(start, end)]


def num_builtin_layers(family: str, cfg: dict[str, Any]) -> int:
    if family == "gpt":
        return int(cfg["num_layers"]) + 2
    if family == "resnet":
        return sum(int(n) for n in cfg["stage_blocks"]) + 2
    if family == "mlp":
        return int(cfg["num_layers"]) + 1
    raise ModelError(f"unknown model family {family!r}; use gpt, resnet, mlp or an entrypoint")


def _snake(config: dict[str, Any]) -> dict[str, Any]:
    return {to_snake(k): v for k, v in config.items()}


def builtin_dataset(
    family: str, cfg: dict[str, Any], seed: int, corpus: str | None = None
) -> Dataset:
    """The dataset that goes with a built-in family (nothing is downloaded)."""
    if family == "gpt":
        if cfg["vocab_size"] < 256:
            raise ModelError(f"byte-level data needs vocabSize >= 256, got {cfg['vocab_size']}")
        return LMDataset(cfg["seq_len"], seed=seed, corpus=corpus)
    if family == "resnet":
        return ImageDataset(cfg["image_size"], cfg["num_classes"], seed=seed)
    return SyntheticDataset(cfg["in_features"], cfg["num_classes"], seed=seed)


def build_model(
    ref: ModelRef,
    *,
    seed: int,
    layer_indices: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    corpus: str | None = None,
    with_data: bool = True,
) -> BuiltModel:
    """Build the layers ``layer_indices`` (default: all) of a model reference.

    Built-in layers are created one by one from their own seed, so which other layers a rank
    builds never changes their weights. A user entry point builds every layer (under
    ``seed``) and the unneeded ones are dropped.
    """
    if ref.family == "custom" or ref.entrypoint:
        return _build_custom(ref, seed=seed, layer_indices=layer_indices, dtype=dtype,
                             device=device)
    cfg = _snake(ref.config)
    n = num_builtin_layers(ref.family, cfg)
    if n != ref.num_layers:
        raise ModelError(f"model {ref.name}: config gives {n} layers, the plan says "
                         f"{ref.num_layers}")
    make = {"gpt": _gpt_layer, "resnet": _resnet_layer, "mlp": _mlp_layer}[ref.family]
    indices = range(n) if layer_indices is None else layer_indices
    layers: dict[int, nn.Module] = {}
    for i in indices:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer_seed(seed, i))
            layer = make(cfg, i)
        layers[i] = layer.to(device=device, dtype=dtype)
    loss = lm_loss if ref.family == "gpt" else class_loss
    data = builtin_dataset(ref.family, cfg, seed, corpus) if with_data else None
    return BuiltModel(layers, n, loss, data)


def load_entrypoint(entrypoint: str) -> Callable[..., Any]:
    """The function an entry point ``module:function`` names.

    Like ``python -m``, the current directory is searched too when the module is not found
    on ``sys.path`` (the ``spantrain`` console script does not put it there), so a model
    next to the job works without setting PYTHONPATH.
    """
    if entrypoint.count(":") != 1 or not all(entrypoint.split(":")):
        raise ModelError(f"entrypoint must be 'module:function', got {entrypoint!r}")
    module_name, func_name = entrypoint.split(":")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            here = os.getcwd()
            top = module_name.split(".")[0]
            if err.name not in (top, module_name) or here in sys.path or "" in sys.path:
                raise
            sys.path.append(here)
            module = importlib.import_module(module_name)
        func = getattr(module, func_name)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"cannot load entrypoint {entrypoint!r}: {err}; the module must be "
                         "importable (on PYTHONPATH or under the current directory)") from None
    if not callable(func):
        raise ModelError(f"entrypoint {entrypoint!r} is not a function")
    return cast(Callable[..., Any], func)


def call_entrypoint(
    entrypoint: str, config: dict[str, Any], *, seed: int
) -> tuple[list[nn.Module], LossFn, Dataset]:
    """Call a user entry point with ``config`` (snake_case keywords) under ``seed``.

    The contract: ``function(**config) -> (layers, loss_fn, dataset)`` where ``layers`` is a
    non-empty sequence of ``nn.Module`` run in order (each one a unit the planner may cut
    after), ``loss_fn(logits, labels)`` is the mean loss over the rows, and ``dataset`` has
    ``batch(step, indices) -> (inputs, labels)``, a pure function of its arguments (every rank
    that needs data calls it for its own rows). Every rank calls the function under the same
    torch seed, so randomly initialised layers agree across ranks.
    """
    func = load_entrypoint(entrypoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            result = func(**_snake(config))
        except TypeError as err:
            raise ModelError(f"entrypoint {entrypoint!r} rejects config {config}: {err}; "
                             "its keyword arguments are the model's config keys") from None
    if not (isinstance(result, tuple | list) and len(result) == 3):
        raise ModelError(f"entrypoint {entrypoint!r} must return (layers, loss_fn, dataset), "
                         f"got {type(result).__name__}")
    layers, loss_fn, dataset = result
    layers = list(layers)
    if not layers or not all(isinstance(layer, nn.Module) for layer in layers):
        raise ModelError(f"entrypoint {entrypoint!r}: layers must be a non-empty list of "
                         "torch.nn.Module")
    if not callable(loss_fn) or not callable(getattr(dataset, "batch", None)):
        raise ModelError(f"entrypoint {entrypoint!r}: loss_fn must be callable and dataset "
                         "must have batch(step, indices) -> (inputs, labels)")
    return layers, loss_fn, dataset


def _build_custom(
    ref: ModelRef,
    *,
    seed: int,
    layer_indices: Sequence[int] | None,
    dtype: torch.dtype,
    device: str | torch.device,
) -> BuiltModel:
    if not ref.entrypoint:
        raise ModelError(f"model {ref.name}: family custom needs an entrypoint "
                         "'module:function'")
    layers, loss_fn, dataset = call_entrypoint(ref.entrypoint, ref.config, seed=seed)
    if len(layers) != ref.num_layers:
        raise ModelError(f"model {ref.name}: entrypoint {ref.entrypoint} returns "
                         f"{len(layers)} layers, the plan (from its profile) says "
                         f"{ref.num_layers}; measure the profile again with spantrain profile")
    indices = range(len(layers)) if layer_indices is None else layer_indices
    kept = {i: layers[i].to(device=device, dtype=dtype) for i in indices}
    return BuiltModel(kept, len(layers), loss_fn, dataset)


# --------------------------------------------------------------------------------------------
# Shapes and sizes (checked against the planner's analytic profile)


def builtin_output_shapes(family: str, cfg: dict[str, Any]) -> list[tuple[int, ...]]:
    """Per-sample output shape of every layer of a built-in family (pure arithmetic)."""
    if family == "gpt":
        s, d = cfg["seq_len"], cfg["d_model"]
        return [(s, d)] * (cfg["num_layers"] + 1) + [(s, cfg["vocab_size"])]
    if family == "resnet":
        expansion = 4 if cfg["block"] == "bottleneck" else 1
        h = cfg["image_size"]
        h = h if h <= 64 else ((h + 1) // 2 + 1) // 2  # 7x7/2 conv, then 3x3/2 max-pool
        shapes = [(cfg["width"], h, h)]
        for _, planes, stride in _resnet_blocks(cfg):
            h = (h + stride - 1) // stride
            shapes.append((planes * expansion, h, h))
        return [*shapes, (cfg["num_classes"],)]
    return [(cfg["hidden"],)] * cfg["num_layers"] + [(cfg["num_classes"],)]


def traced_output_shapes(ref: ModelRef, seed: int = 0) -> list[tuple[int, ...]]:
    """Per-sample output shapes found by running the layers.

    Built-in models run on the meta device (no memory, no compute), so this works for the
    largest presets; a user model runs one real sample.
    """
    if ref.family == "custom" or ref.entrypoint:
        built = build_model(ref, seed=seed)
        assert built.dataset is not None
        x, _ = built.dataset.batch(0, [0])
    else:
        with torch.device("meta"):
            built = build_model(ref, seed=seed, device="meta", with_data=False)
        x = example_input(ref.family, _snake(ref.config)).to("meta")
    shapes = []
    with torch.no_grad():
        for i in range(built.num_layers):
            x = built.layers[i](x)
            shapes.append(tuple(x.shape[1:]))
    return shapes


def layer_output_shapes(ref: ModelRef, seed: int = 0) -> list[tuple[int, ...]]:
    """Per-sample output shape of every layer (what crosses a stage boundary)."""
    if ref.family == "custom" or ref.entrypoint:
        return traced_output_shapes(ref, seed)
    return builtin_output_shapes(ref.family, _snake(ref.config))


def example_input(family: str, cfg: dict[str, Any]) -> Tensor:
    """A one-sample input of a built-in family (zeros of the right shape and dtype)."""
    if family == "gpt":
        return torch.zeros(1, cfg["seq_len"], dtype=torch.long)
    if family == "resnet":
        return torch.zeros(1, 3, cfg["image_size"], cfg["image_size"])
    return torch.zeros(1, cfg["in_features"])


def param_counts(layers: Sequence[nn.Module]) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in layers]


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
