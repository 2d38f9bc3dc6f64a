"""The torch models agree with the planner's analytic profiles, layer by layer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from spantrain_planner.inputs.profiles import preset, preset_names  # noqa: E402
from spantrain_planner.passes.assemble import model_ref  # noqa: E402
from spantrain_worker.models import (  # noqa: E402
    build_model,
    layer_output_shapes,
    numel,
    param_counts,
    traced_output_shapes,
)

pytestmark = pytest.mark.torch

CHEAP = ["gpt-tiny", "gpt-mini", "mlp-tiny", "resnet-tiny", "resnet18"]


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_matches_its_profile_on_meta(name: str) -> None:
    """Parameter counts and boundary bytes of every layer, every preset (meta device)."""
    profile = preset(name)
    ref = model_ref(profile)
    with torch.device("meta"):
        built = build_model(ref, seed=0, device="meta", with_data=False)
    assert built.num_layers == profile.num_layers
    counts = param_counts(built.stage(0, built.num_layers))
    shapes = traced_output_shapes(ref)
    assert shapes == layer_output_shapes(ref)  # the analytic shapes the runtime uses
    for i, layer in enumerate(profile.layers):
        assert counts[i] == layer.param_count, f"{name} layer {i} ({layer.name})"
        assert numel(shapes[i]) * 4 == layer.output_bytes, f"{name} layer {i} ({layer.name})"


@pytest.mark.parametrize("name", CHEAP)
def test_cheap_presets_instantiate_and_run(name: str) -> None:
    profile = preset(name)
    built = build_model(model_ref(profile), seed=0)
    assert sum(param_counts(built.stage(0, built.num_layers))) == profile.param_count
    assert built.dataset is not None
    x, labels = built.dataset.batch(0, range(2))
    for i in range(built.num_layers):
        x = built.layers[i](x)
        assert x.shape[0] * profile.layers[i].output_bytes == x.numel() * 4
    loss = built.loss_fn(x, labels)
    assert torch.isfinite(loss)


def test_layer_init_does_not_depend_on_which_layers_are_built() -> None:
    ref = model_ref(preset("gpt-tiny"))
    full = build_model(ref, seed=3, with_data=False)
    part = build_model(ref, seed=3, layer_indices=[2, 3], with_data=False)
    for i in (2, 3):
        for (n, a), (_, b) in zip(full.layers[i].named_parameters(),
                                  part.layers[i].named_parameters(), strict=True):
            assert torch.equal(a, b), n
    other = build_model(ref, seed=4, layer_indices=[2], with_data=False)
    assert not torch.equal(other.layers[2].qkv.weight, part.layers[2].qkv.weight)
