"""The checklist as policy: method resolution, data-size rules, GPU-memory preflight, goal checks
and required secrets. Table-driven; every decision's reason is checked for what a user needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from finetune_operator import api, policy
from finetune_operator.api import ResolvedMethodType as M
from finetune_operator.policy import Verdict
from finetune_operator.settings import OperatorSettings

Spec = dict[str, Any]
GIB_LABEL = "nvidia.com/gpu.memory"


def gpus(memory_gib: int, per_node: int = 1, nodes: int = 1) -> dict[str, Any]:
    return {
        "resources": {
            "gpusPerNode": per_node,
            "nodes": nodes,
            "nodeSelector": {GIB_LABEL: str(memory_gib * 1024)},
        }
    }


# (id, changes to the valid spec, cloud detected, expected method, expected ZeRO stage, phrases in the reason)
METHOD_CASES: list[tuple[str, dict[str, Any], bool, M, int | None, list[str]]] = [
    (
        "onprem-small-gpu-qlora",
        {"environment": "onprem", "model": {"parameters": "7B"}, **gpus(24)},
        False,
        M.QLORA,
        None,
        ["on-prem", "spec.environment", "QLoRA", "LoRA would need", "24 GiB"],
    ),
    (
        "onprem-ample-gpu-lora",
        {"environment": "onprem", "model": {"parameters": "7B"}, **gpus(80)},
        False,
        M.LORA,
        None,
        ["on-prem", "LoRA, because it uses at most 50%", "80 GiB"],
    ),
    (
        "onprem-audio-never-qlora",
        {"environment": "onprem", "model": {"parameters": "7B"}, "dataset": {"format": "audio"}, **gpus(24)},
        False,
        M.LORA,
        None,
        ["audio"],
    ),
    (
        "onprem-cpu-only-qlora",
        {"environment": "onprem", "resources": {"gpusPerNode": 0}},
        False,
        M.QLORA,
        None,
        ["no GPU requested"],
    ),
    (
        "cloud-large-data-full-zero2",
        {"environment": "cloud", "dataset": {"expectedExamples": 12000}, **gpus(24)},
        False,
        M.FULL,
        2,
        ["cloud", "12,000 examples", "at least 5,000", "ZeRO-2"],
    ),
    (
        "cloud-large-model-full-zero3",
        {
            "environment": "cloud",
            "model": {"parameters": "13B"},
            "dataset": {"expectedExamples": 50000},
            **gpus(40, 8),
        },
        False,
        M.FULL,
        3,
        ["ZeRO-3", "8 process(es)"],
    ),
    (
        "cloud-small-data-lora",
        {"environment": "cloud", "dataset": {"expectedExamples": 3000}, **gpus(80)},
        False,
        M.LORA,
        None,
        ["3,000 examples", "fewer than 5,000"],
    ),
    (
        "cloud-unknown-size-lora",
        {"environment": "cloud", **gpus(80)},
        False,
        M.LORA,
        None,
        ["size is unknown", "spec.dataset.expectedExamples"],
    ),
    (
        "cloud-full-does-not-fit-lora",
        {
            "environment": "cloud",
            "model": {"parameters": "7B"},
            "dataset": {"expectedExamples": 12000},
            **gpus(24),
        },
        False,
        M.LORA,
        None,
        ["does not fit even with ZeRO-3", "GiB per GPU"],
    ),
    (
        "detected-cloud-from-node-labels",
        {"dataset": {"expectedExamples": 9000}, **gpus(80)},
        True,
        M.FULL,
        2,
        ["nodes carry cloud-provider labels"],
    ),
    (
        "no-cloud-labels-means-onprem",
        {"model": {"parameters": "7B"}, **gpus(24)},
        False,
        M.QLORA,
        None,
        ["no node carries a cloud-provider label"],
    ),
    (
        "assumed-size-is-said",
        {"environment": "onprem", "model": {"source": "hf://org/model", "parameters": None}, **gpus(24)},
        False,
        M.QLORA,
        None,
        ["assumed 7B parameters (the model's size was not looked up; set spec.model.parameters)"],
    ),
    (
        "explicit-qlora-kept",
        {
            "method": {"type": "qlora", "quantization": {}},
            "environment": "cloud",
            "dataset": {"expectedExamples": 99999},
        },
        False,
        M.QLORA,
        None,
        ["requested in spec.method.type"],
    ),
    (
        "explicit-full-stage-kept",
        {"method": {"type": "full", "deepspeed": {"stage": 3}}, **gpus(80, 4)},
        False,
        M.FULL,
        3,
        ["ZeRO-3 from spec.method.deepspeed.stage"],
    ),
    (
        "explicit-full-stage-chosen",
        {"method": {"type": "full"}, **gpus(80, 8, 2)},
        False,
        M.FULL,
        2,
        ["ZeRO-2, the lowest stage that fits", "16 process(es)"],
    ),
]


@pytest.mark.parametrize(
    ("changes", "cloud", "method", "stage", "phrases"),
    [c[1:] for c in METHOD_CASES],
    ids=[c[0] for c in METHOD_CASES],
)
def test_resolve_method(
    spec_dict: Callable[..., Spec],
    settings: OperatorSettings,
    changes: dict[str, Any],
    cloud: bool,
    method: M,
    stage: int | None,
    phrases: list[str],
) -> None:
    decision = policy.resolve_method(api.parse_spec(spec_dict(**changes)), settings, cloud_detected=cloud)
    assert (decision.type, decision.deepspeed_stage) == (method, stage), decision.reason
    for phrase in phrases:
        assert phrase in decision.reason


@pytest.mark.parametrize(
    ("spec_env", "setting", "cloud", "expected", "source"),
    [
        ("onprem", "cloud", True, api.Environment.ONPREM, "spec.environment"),
        ("auto", "onprem", True, api.Environment.ONPREM, "FINETUNE_OPERATOR_ENVIRONMENT"),
        ("auto", "cloud", False, api.Environment.CLOUD, "FINETUNE_OPERATOR_ENVIRONMENT"),
        ("auto", "auto", True, api.Environment.CLOUD, "cloud-provider labels"),
        ("auto", "auto", False, api.Environment.ONPREM, "no node"),
    ],
)
def test_environment_comes_from_spec_then_setting_then_nodes(
    spec_dict: Callable[..., Spec],
    spec_env: str,
    setting: str,
    cloud: bool,
    expected: api.Environment,
    source: str,
) -> None:
    settings = OperatorSettings(environment=api.Environment(setting))
    env, reason = policy.resolve_environment(
        api.parse_spec(spec_dict(environment=spec_env)), settings, cloud_detected=cloud
    )
    assert env == expected
    assert source in reason


@pytest.mark.parametrize(
    ("labels", "provider_ids", "cloud"),
    [
        ([{"eks.amazonaws.com/nodegroup": "gpu"}], [], True),
        ([{"kubernetes.io/hostname": "a"}, {"cloud.google.com/gke-nodepool": "p"}], [], True),
        ([{"node.kubernetes.io/instance-type": "p4d.24xlarge"}], [], True),
        ([{"kubernetes.io/hostname": "gpu-01", "nvidia.com/gpu.memory": "81920"}], [], False),
        ([], ["aws:///us-east-1a/i-0abc"], True),
        ([], ["kind://docker/kind/kind-control-plane"], False),
    ],
)
def test_looks_like_cloud(labels: list[dict[str, str]], provider_ids: list[str], cloud: bool) -> None:
    assert policy.looks_like_cloud(labels, provider_ids) is cloud


@pytest.mark.parametrize(("text", "count"), [("0.5B", 5e8), ("7B", 7e9), ("125M", 1.25e8), ("1.5T", 1.5e12)])
def test_parse_parameter_count(text: str, count: float) -> None:
    assert policy.parse_parameter_count(text) == pytest.approx(count)


def test_parse_parameter_count_says_the_accepted_form() -> None:
    with pytest.raises(ValueError, match=r"'seven billion'.*0\.5B or 7B"):
        policy.parse_parameter_count("seven billion")


# ---------------------------------------------------------------------------------------------
# Memory estimate


def test_full_fine_tuning_costs_sixteen_bytes_per_parameter_before_sharding() -> None:
    estimate = policy.estimate_memory(M.FULL, 1e9, ranks=1)
    states = estimate.weights + estimate.gradients + estimate.optimizer
    assert states == pytest.approx(16e9 / policy.GIB)
    assert estimate.total == pytest.approx(states + estimate.activations)


def test_methods_order_by_memory_and_sharding_helps() -> None:
    params = 7e9
    qlora = policy.estimate_memory(M.QLORA, params).total
    lora = policy.estimate_memory(M.LORA, params).total
    zero2 = policy.estimate_memory(M.FULL, params, ranks=8, deepspeed_stage=2).total
    zero3 = policy.estimate_memory(M.FULL, params, ranks=8, deepspeed_stage=3).total
    single = policy.estimate_memory(M.FULL, params, ranks=1, deepspeed_stage=2).total
    assert qlora < lora < single
    assert zero3 < zero2 < single
    offloaded = policy.estimate_memory(M.FULL, params, ranks=8, deepspeed_stage=3, offload="optimizer")
    assert offloaded.optimizer == 0 and offloaded.total < zero3
    assert policy.estimate_memory(M.QLORA, params, double_quant=False).total > qlora


def test_activation_allowance_grows_with_tokens_and_without_checkpointing() -> None:
    small = policy.activation_allowance_gib(1024, gradient_checkpointing=True)
    large = policy.activation_allowance_gib(8192, gradient_checkpointing=True)
    unchecked = policy.activation_allowance_gib(8192, gradient_checkpointing=False)
    assert policy.CUDA_CONTEXT_GIB < small < large < unchecked


def preflight_memory(
    spec_dict: Callable[..., Spec], settings: OperatorSettings, memory_mib: int
) -> policy.Finding:
    spec = api.parse_spec(
        spec_dict(
            method={"type": "lora"},
            model={"parameters": "7B"},
            resources={"nodeSelector": {GIB_LABEL: str(memory_mib)}},
        )
    )
    decision = policy.resolve_method(spec, settings)
    return policy.check_gpu_memory(decision, policy.hardware(spec, settings))


@pytest.mark.parametrize(
    ("share_of_gpu", "verdict", "reason", "phrase"),
    [
        (0.5, Verdict.OK, "EstimateFits", "GiB available"),
        (0.95, Verdict.WARN, "EstimateTight", "out-of-memory is likely; use method.type qlora"),
        (1.3, Verdict.REFUSE, "EstimateExceedsGPU", "does not fit; use method.type qlora"),
    ],
)
def test_gpu_memory_preflight(
    spec_dict: Callable[..., Spec],
    settings: OperatorSettings,
    share_of_gpu: float,
    verdict: Verdict,
    reason: str,
    phrase: str,
) -> None:
    needed = policy.estimate_for(
        api.parse_spec(spec_dict(method={"type": "lora"}, model={"parameters": "7B"})), M.LORA, 7e9, 1
    ).total
    memory_mib = int(needed / share_of_gpu * 1024)
    finding = preflight_memory(spec_dict, settings, memory_mib)
    assert (finding.condition, finding.verdict, finding.reason) == ("MemoryFits", verdict, reason)
    assert (
        f"{needed:.1f} GiB" in finding.message and f"{memory_mib / 1024:g} GiB available" in finding.message
    )
    assert phrase in finding.message


def test_gpu_memory_falls_back_to_the_operator_setting(spec_dict: Callable[..., Spec]) -> None:
    hw = policy.hardware(api.parse_spec(spec_dict()), OperatorSettings(gpu_memory_gib=48))
    assert (hw.gpu_memory_gib, hw.gpu_memory_source) == (
        48,
        "operator setting FINETUNE_OPERATOR_GPU_MEMORY_GIB",
    )


# ---------------------------------------------------------------------------------------------
# Data size and goal


@pytest.mark.parametrize(
    ("method", "examples", "allow", "verdict", "phrases"),
    [
        (
            M.FULL,
            800,
            False,
            Verdict.REFUSE,
            ["800 examples", "fewer than 1,000", "lora or qlora", "allowSmallDataFullFineTune: true"],
        ),
        (M.FULL, 999, True, Verdict.WARN, ["allowed by spec.method.allowSmallDataFullFineTune"]),
        (M.FULL, 1000, False, Verdict.WARN, ["fewer than 5,000", "consider spec.method.type lora"]),
        (M.FULL, 4999, False, Verdict.WARN, ["4,999 examples"]),
        (M.FULL, 5000, False, Verdict.OK, []),
        (M.LORA, 200, False, Verdict.OK, []),
        (M.QLORA, 10, False, Verdict.OK, []),
        (M.FULL, None, False, Verdict.OK, ["not known yet"]),
    ],
)
def test_small_data_rules(
    method: M, examples: int | None, allow: bool, verdict: Verdict, phrases: list[str]
) -> None:
    finding = policy.check_data_size(method, examples, allow_small=allow)
    assert (finding.condition, finding.verdict) == ("DataSufficient", verdict)
    for phrase in phrases:
        assert phrase in finding.message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"dataset": {"expectedExamples": 10}}, [("NoTestExamples", Verdict.REFUSE)]),
        ({"dataset": {"expectedExamples": 500}}, [("FewTestExamples", Verdict.WARN)]),
        ({"dataset": {"expectedExamples": 5000}}, []),
        (
            {
                "goal": {"heldOutTest": False, "testFile": "s3://d/test.jsonl"},
                "dataset": {"expectedExamples": 10},
            },
            [],
        ),
        ({"goal": {"successCriteria": []}}, [("NoSuccessCriteria", Verdict.WARN)]),
    ],
)
def test_goal_checks(
    spec_dict: Callable[..., Spec], changes: dict[str, Any], expected: list[tuple[str, Verdict]]
) -> None:
    findings = policy.check_goal(api.parse_spec(spec_dict(**changes)))
    assert [(f.reason, f.verdict) for f in findings] == expected
    assert all("spec." in f.message for f in findings)


# ---------------------------------------------------------------------------------------------
# Secrets


def test_required_secrets_lists_every_reference_once(spec_dict: Callable[..., Spec]) -> None:
    spec = api.parse_spec(
        spec_dict(
            env=[
                {"name": "HF_TOKEN", "secretKeyRef": {"name": "hub", "key": "token"}},
                {"name": "HUB_TOKEN_COPY", "secretKeyRef": {"name": "hub", "key": "token"}},
                {"name": "LOG_LEVEL", "value": "info"},
            ]
        )
    )
    refs = [(r.name, r.key, r.referenced_by) for r in policy.required_secrets(spec)]
    assert refs == [
        ("hub", "token", "spec.env HF_TOKEN, spec.env HUB_TOKEN_COPY"),
        ("s3-creds", "accessKeyId", "spec.checkpoints.store.credentialsSecret"),
        ("s3-creds", "secretAccessKey", "spec.checkpoints.store.credentialsSecret"),
    ]


def test_no_credentials_secret_means_default_chain(spec_dict: Callable[..., Spec]) -> None:
    spec = api.parse_spec(spec_dict(checkpoints={"store": {"bucket": "ckpt", "credentialsSecret": None}}))
    assert policy.required_secrets(spec) == []


@pytest.mark.parametrize(
    ("present", "verdict", "phrases"),
    [
        ({"s3-creds": ["accessKeyId", "secretAccessKey"]}, Verdict.OK, []),
        (
            {},
            Verdict.REFUSE,
            ["Secret s3-creds not found in namespace team-a", "spec.checkpoints.store.credentialsSecret"],
        ),
        ({"s3-creds": ["accessKeyId"]}, Verdict.REFUSE, ["Secret s3-creds has no key secretAccessKey"]),
    ],
)
def test_check_secrets(
    spec_dict: Callable[..., Spec], present: dict[str, list[str]], verdict: Verdict, phrases: list[str]
) -> None:
    finding = policy.check_secrets(policy.required_secrets(api.parse_spec(spec_dict())), present, "team-a")
    assert (finding.condition, finding.verdict) == ("SecretsReady", verdict)
    for phrase in phrases:
        assert phrase in finding.message
    assert finding.message.count("not found") <= 1  # one line per missing Secret, not per key


def test_preflight_refuses_and_warns_with_everything_it_found(
    spec_dict: Callable[..., Spec], settings: OperatorSettings
) -> None:
    spec = api.parse_spec(
        spec_dict(
            method={"type": "full", "allowSmallDataFullFineTune": False}, dataset={"expectedExamples": 600}
        )
    )
    result = policy.preflight(spec, settings, namespace="team-a", secret_keys={}, cloud_detected=True)
    assert result.is_cloud
    assert {f.reason for f in result.refused} == {"TooFewExamplesForFull", "SecretMissing"}
    assert {f.reason for f in result.warnings} == {"FewTestExamples"}
    ok = policy.preflight(
        api.parse_spec(spec_dict(dataset={"expectedExamples": 20000})),
        settings,
        namespace="team-a",
        secret_keys={"s3-creds": {"accessKeyId", "secretAccessKey"}},
    )
    assert ok.refused == () and not ok.is_cloud
