"""SpanTrainJob API models: parsing, cross-field rules, planner inputs, example manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from spantrain_planner import api
from spantrain_planner.core.errors import InputError
from spantrain_planner.core.options import PlannerOptions

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"


def spec(**kw: object) -> api.SpanTrainJobSpec:
    data: dict[str, object] = {"model": {"preset": "gpt-mini"}}
    data.update(kw)
    return api.parse_spec(data)


def test_defaults_and_aliases() -> None:
    s = spec(training={"globalBatch": 16, "steps": 300})
    assert s.training.global_batch == 16 and s.training.steps == 300
    assert s.rendezvous.port == 29500 and s.rendezvous.address_mode == "auto"
    assert s.failure_policy.max_restarts == 3 and s.run_policy.clean_pod_policy == "Running"
    dumped = s.model_dump(by_alias=True, exclude_none=True)
    assert dumped["training"]["globalBatch"] == 16 and "failurePolicy" in dumped


def test_planner_spec_mirrors_planner_options() -> None:
    ours = set(api.PlannerSpec.model_fields) - api.RUNTIME_PLANNER_FIELDS
    theirs = set(PlannerOptions.model_fields) - {"global_batch"}
    assert ours == theirs
    for name in ours:
        assert (api.PlannerSpec.model_fields[name].description
                == PlannerOptions.model_fields[name].description)


def test_planner_inputs_preset_family_entrypoint() -> None:
    s = spec(training={"globalBatch": 16}, planner={"schedule": "zb", "maxStages": 2})
    inputs = api.planner_inputs(s)
    assert inputs.options.global_batch == 16 and inputs.options.schedule == "zb"
    assert inputs.options.max_stages == 2
    assert inputs.profile.name == "gpt-mini" and inputs.profile.family == "gpt"
    bf16 = api.planner_inputs(spec(training={"precision": "bf16"})).profile
    assert bf16.bytes_per_element == 2

    fam = api.parse_spec({"model": {"family": "mlp", "name": "m", "config": {
        "inFeatures": 8, "hidden": 16, "numLayers": 3, "numClasses": 4}}})
    prof = api.model_profile(fam)
    assert prof.family == "mlp" and prof.num_layers == 4 and prof.name == "m"

    layer = {"name": "l0", "forwardFlops": 1e6, "backwardInputFlops": 1e6,
             "backwardWeightFlops": 1e6, "paramCount": 10, "paramBytes": 40,
             "outputBytes": 64, "stashBytes": 64}
    ep = api.parse_spec({"model": {"entrypoint": "my.pkg:build",
                                   "profile": {"name": "mine", "layers": [layer, layer]}}})
    prof = api.model_profile(ep)
    assert prof.family == "custom" and prof.entrypoint == "my.pkg:build" and prof.num_layers == 2


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"model": {"preset": "gpt-mini", "family": "gpt"}}, "exactly one"),
        ({"model": {}}, "exactly one"),
        ({"model": {"preset": "gpt-mini", "config": {"a": 1}}}, "model.config needs"),
        ({"model": {"preset": "gpt-mini"}, "training": {"steps": 5, "warmupSteps": 9}},
         "warmupSteps"),
        ({"model": {"preset": "gpt-mini"}, "training": {"globalBatch": 4},
          "planner": {"numMicrobatches": 8}}, "numMicrobatches"),
        ({"model": {"preset": "gpt-mini"}, "env": [{"name": "RANK", "value": "1"}]}, "reserved"),
        ({"model": {"preset": "gpt-mini"}, "placement": {"matchExpressions": [
            {"key": "a", "operator": "In"}]}}, "operator In"),
        ({"model": {"preset": "gpt-mini"}, "training": {"epochs": 3}}, "epochs"),
        ({"model": {"preset": "gpt-mini"}, "planner": {"schedule": "pipedream"}}, "schedule"),
    ],
)
def test_invalid_specs(data: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError) as info:
        api.parse_spec(data)
    assert words in str(info.value)


def test_unknown_preset_and_missing_profile_are_input_errors() -> None:
    with pytest.raises(InputError, match="unknown"):
        api.planner_inputs(spec(model={"preset": "gpt-huge"}))
    with pytest.raises(InputError, match="model.profile"):
        api.planner_inputs(api.parse_spec({"model": {"entrypoint": "a:b"}}))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse_and_plan_inputs(path: Path) -> None:
    job = api.load_job(path)
    api.planner_inputs(job.spec)


@pytest.mark.parametrize("path", sorted((EXAMPLES / "invalid").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_invalid_examples_rejected(path: Path) -> None:
    with pytest.raises(InputError):
        api.load_job(path)


def test_gpt_local_is_the_quick_start_job() -> None:
    job = api.load_job(EXAMPLES / "gpt-local.yaml")
    assert job.spec.model.preset == "gpt-mini"
    assert job.spec.training.global_batch == 16 and 200 <= job.spec.training.steps <= 400


def test_status_model_round_trip() -> None:
    st = api.SpanTrainJobStatus.model_validate({
        "phase": "Running", "restarts": 1, "ready": "3/3",
        "conditions": [{"type": "Running", "status": "True", "reason": "AllWorkersRunning",
                        "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 2}],
        "plan": {"hash": "abc", "configMap": "j-plan-abc", "schedule": "zb", "numStages": 2,
                 "numDevices": 3, "numMicrobatches": 4, "microbatchSize": 4},
        "unknownFutureField": 1,
    })
    assert st.plan is not None and st.plan.num_stages == 2 and st.conditions[0].status == "True"
