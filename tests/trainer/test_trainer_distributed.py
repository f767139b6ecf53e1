"""Where a trainer process sits in a multi-pod job, and DeepSpeed ZeRO-2 and 3 as two processes on CPU."""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.deepspeed import (
    HfDeepSpeedConfig,
    is_deepspeed_zero3_enabled,
    unset_hf_deepspeed_config,
)

from finetune_trainer import evaluation
from finetune_trainer.checkpoints.fingerprint import RestoreCheck
from finetune_trainer.config import ConfigError
from finetune_trainer.distributed import SINGLE, checkpoint_wait, rendezvous_from_env
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.testing.cli import Result, Running, base_config, start_trainer
from finetune_trainer.testing.tiny import QUESTION, synthetic_dataset, write_jsonl

# What the operator sets on pod <job>-1 of a two-node job with one GPU per node.
OPERATOR_ENV = {
    "NNODES": "2",
    "NODE_RANK": "1",
    "WORLD_SIZE": "2",
    "MASTER_ADDR": "job-0.job-workers",
    "MASTER_PORT": "29500",
}

# What the launcher sets on the processes of a one-pod job with gpusPerNode 2.
LAUNCHED_ONE_POD = {
    "NNODES": "1",
    "NODE_RANK": "0",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "LOCAL_RANK": "0",
    "RANK": "0",
    "MASTER_ADDR": "10.0.0.7",
    "MASTER_PORT": "29500",
}


@pytest.mark.parametrize(
    ("env", "cuda_devices", "rank", "world"),
    [
        ({}, 0, 0, 1),
        (OPERATOR_ENV, 0, 1, 2),
        (OPERATOR_ENV | {"NODE_RANK": "0"}, 1, 0, 2),
        # gpusPerNode 4 but no launcher (an operator that predates NPROC_PER_NODE): one per pod.
        (OPERATOR_ENV | {"WORLD_SIZE": "8"}, 0, 1, 2),
        # gpusPerNode 4 under the launcher (or torchrun): the fourth GPU's process of the second pod.
        (OPERATOR_ENV | {"WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 4, 7, 8),
        # The same on CPU, where processes stand in for GPUs.
        (OPERATOR_ENV | {"WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 0, 7, 8),
        # One pod with two GPUs: its second process.
        (LAUNCHED_ONE_POD | {"LOCAL_RANK": "1"}, 2, 1, 2),
    ],
)
def test_rank_and_world_size_follow_the_operator_env(
    env: dict[str, str], cuda_devices: int, rank: int, world: int
) -> None:
    r = rendezvous_from_env(env, cuda_devices)
    assert (r.rank, r.world_size) == (rank, world)
    assert r.is_main == (rank == 0)


def test_one_node_is_a_single_process() -> None:
    assert rendezvous_from_env({"NNODES": "1"}, 0) == SINGLE


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"NODE_RANK": "one"}, "env NODE_RANK: got 'one': must be an integer >= 0"),
        ({"NODE_RANK": "2"}, "env NODE_RANK: got 2: must be below NNODES 2"),
        ({"MASTER_ADDR": ""}, "env MASTER_ADDR: not set on a multi-node job"),
        ({"MASTER_PORT": "0"}, "env MASTER_PORT: got '0': must be an integer >= 1"),
        (
            {"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"},
            "env LOCAL_RANK: got 2 but the pod sees 2 GPUs (fix: resources.gpusPerNode 4 must match",
        ),
        (
            {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "8"},
            "env WORLD_SIZE: got 8 but NNODES x LOCAL_WORLD_SIZE is 4",
        ),
    ],
)
def test_bad_rendezvous_env_names_the_variable_and_value(change: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rendezvous_from_env(OPERATOR_ENV | change, 2)
    assert caught.value.messages[0].startswith(expected)
    assert "fix:" in caught.value.messages[0]


@pytest.mark.parametrize(
    ("part_bytes", "world_size", "minutes"),
    [
        (0, 2, 10.0),  # nothing measured: the collective timeout
        (100_000_000, 2, 10.0),  # small checkpoints verify in seconds
        (1_000_000_000, 16, 16.0),  # 16 GB in all: three passes at 50 MB/s
        (10_000_000_000, 16, 160.0),  # a 70B model's ZeRO checkpoint: no fixed 30-minute limit
    ],
)
def test_the_wait_for_rank_0s_checkpoint_scales_with_its_size(
    part_bytes: int, world_size: int, minutes: float
) -> None:
    assert checkpoint_wait(part_bytes, world_size).total_seconds() == pytest.approx(minutes * 60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ranks(
    model: Path,
    tmp_path: Path,
    stage: int = 2,
    metrics: tuple[str, ...] = ("eval_loss",),
    validation: dict[str, object] | None = None,
    **hyperparameters: object,
) -> list[Running]:
    """Two trainer processes of one job, rank 1 first (it waits for rank 0 to evaluate the baseline)."""
    data = write_jsonl(synthetic_dataset(600, seed=0), tmp_path / "train.jsonl")
    local = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    env = OPERATOR_ENV | local
    running = []
    for rank in (1, 0):
        out = tmp_path / f"rank{rank}"
        config = zero_config(model, data, out, stage, metrics, validation, **hyperparameters)
        running.append(start_trainer(config, out, env | {"NODE_RANK": str(rank)}))
    return running


def zero_config(
    model: Path,
    data: Path,
    out: Path,
    stage: int = 2,
    metrics: tuple[str, ...] = ("eval_loss",),
    validation: dict[str, object] | None = None,
    **hyperparameters: object,
) -> dict[str, object]:
    config = base_config(
        model,
        data,
        out,
        "full",
        goal={"metrics": list(metrics), "successCriteria": [{"metric": "eval_loss", "maxRegression": 0}]},
        hyperparameters={"batchSize": 8, "learningRate": 3e-3, "loggingSteps": 5, **hyperparameters},
        checkpoints={"everySteps": 10},
        validation=validation or {},
    )
    config["method"] |= {"allowSmallDataFullFineTune": True, "deepspeed": {"enabled": True, "stage": stage}}
    return config


def finish_all(running: list[Running], timeout: float) -> list[Result]:
    """Every rank's result; ranks still running after `timeout` (a rank waiting in a collective
    that another never entered) are killed, so a deadlock fails the test instead of hanging it."""
    try:
        return [r.finish(timeout=timeout) for r in running]
    finally:
        for r in running:
            if r.process.poll() is None:
                r.process.kill()
                r.process.wait()


def test_zero2_trains_as_two_processes_and_only_rank_0_reports(tiny_model: Path, tmp_path: Path) -> None:
    results = finish_all(start_ranks(tiny_model, tmp_path, maxSteps=20), timeout=300)
    rank1, rank0 = results
    assert [r.code for r in results] == [ExitCode.SUCCEEDED, ExitCode.SUCCEEDED], rank0.log[-3000:]
    for rank, result in ((0, rank0), (1, rank1)):
        assert f"process group ready: rank {rank} of world size 2, backend gloo" in result.log

    report = rank0.report()
    assert report["phase"] == "Succeeded"
    assert report["final"]["eval_loss"] < report["baseline"]["eval_loss"]
    assert report["progress"]["step"] == 20
    # The data is split between the ranks: 20 steps of 2 x 8 examples cover 320 of the 540.
    assert report["progress"]["epoch"] == pytest.approx(20 * 16 / 540, abs=0.01)
    assert (rank0.out / "final" / "model.safetensors").is_file()
    assert json.loads((rank0.out / "final" / "metrics.json").read_text())["final"]["eval_loss"] > 0

    assert not (rank1.out / "progress.json").exists()
    assert not (rank1.out / "final").exists()
    assert "baseline:" not in rank1.log
    # Each rank saved its own ZeRO optimizer shard.
    assert list((rank1.out / "checkpoints").glob("checkpoint-20/global_step20/zero_pp_rank_1_*"))
    assert not re.search(r"deepspeed_shm_comm\w* built", rank0.log + rank1.log)


def test_one_pod_with_two_gpus_runs_two_ranks_through_the_launcher(tiny_model: Path, tmp_path: Path) -> None:
    """NPROC_PER_NODE (the operator's gpusPerNode) processes in one pod; on CPU they stand in for GPUs."""
    data = write_jsonl(synthetic_dataset(600, seed=0), tmp_path / "train.jsonl")
    out = tmp_path / "pod"
    env = {
        "NPROC_PER_NODE": "2",
        "POD_IP": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    config = zero_config(tiny_model, data, out, maxSteps=20) | {"metricsPort": _free_port()}
    result = start_trainer(config, out, env).finish(timeout=300)
    assert result.code == ExitCode.SUCCEEDED, result.log[-4000:]
    assert "launching 2 trainer processes in this pod: ranks 0-1 of world size 2 (1 pods)" in result.log
    for rank in (0, 1):
        assert (
            f"rank {rank} INFO finetune_trainer.distributed: process group ready: rank {rank} of world size 2"
            in result.log
        )
    report = result.report()
    assert report["phase"] == "Succeeded" and report["progress"]["step"] == 20
    assert report["ranks"] == {"worldSize": 2, "perPod": 2, "pods": 1}
    assert report["progress"]["epoch"] == pytest.approx(20 * 16 / 540, abs=0.01), "both ranks got data"
    assert (out / "final" / "model.safetensors").is_file()
    # Each process kept its own part of each checkpoint, as a pod of its own would.
    assert list(out.glob("local-rank-1/checkpoints/checkpoint-20/global_step20/zero_pp_rank_1_*"))
    assert list(out.glob("checkpoints/checkpoint-20/global_step20/zero_pp_rank_0_*"))
    assert result.log.count("metrics on ") == 1, "one /metrics port per pod"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_train_data_parallel_in_one_pod_with_two_gpus(
    tiny_model: Path, tmp_path: Path, method: str
) -> None:
    """LoRA and QLoRA on several GPUs: one process per GPU, each with its own copy of the (4-bit)
    base model, gradients averaged between them (DDP, no DeepSpeed)."""
    data = write_jsonl(synthetic_dataset(600, seed=0), tmp_path / "train.jsonl")
    out = tmp_path / "pod"
    config = base_config(
        tiny_model,
        data,
        out,
        method,
        goal={"metrics": ["eval_loss"], "successCriteria": [{"metric": "eval_loss", "maxRegression": 0}]},
        hyperparameters={"batchSize": 8, "learningRate": 3e-3, "loggingSteps": 5, "maxSteps": 20},
        checkpoints={"everySteps": 10},
    )
    env = {
        "NPROC_PER_NODE": "2",
        "POD_IP": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    result = start_trainer(config, out, env).finish(timeout=300)
    assert result.code == ExitCode.SUCCEEDED, result.log[-4000:]
    assert sorted(re.findall(r"process group ready: rank (\d) of world size 2", result.log)) == ["0", "1"]
    report = result.report()
    assert report["ranks"] == {"worldSize": 2, "perPod": 2, "pods": 1}
    assert report["progress"]["epoch"] == pytest.approx(20 * 16 / 540, abs=0.01), "both ranks got data"
    assert report["final"]["eval_loss"] < report["baseline"]["eval_loss"]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "local-rank-1" / "checkpoints" / "checkpoint-20" / "rng_state_1.pth").is_file()
    assert "baseline:" not in "".join(line for line in result.log.splitlines() if " rank 1 " in line)


def test_sigterm_to_one_pod_stops_both_ranks_at_the_same_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    rank1, rank0 = start_ranks(tiny_model, tmp_path, maxSteps=400)
    rank1.wait_for(r'progress: \{"step":5,', timeout=240)
    rank1.process.send_signal(signal.SIGTERM)
    results = finish_all([rank1, rank0], timeout=240)
    assert [r.code for r in results] == [ExitCode.PREEMPTED_CHECKPOINTED] * 2, results[1].log[-3000:]
    saved = [sorted(p.name for p in (r.out / "checkpoints").glob("checkpoint-*")) for r in results]
    assert saved[0] == saved[1] and saved[0], saved
    assert "preempted: checkpoint of step" in json.dumps(results[1].report())


def test_zero3_generates_on_both_ranks_and_saves_whole_weights(tiny_model: Path, tmp_path: Path) -> None:
    """ZeRO-3 splits every weight between the ranks: evaluation and generation run on both in
    lockstep, rank 0 alone reports, and the saved model holds all of each weight."""
    validation = {
        "prompts": [f"{QUESTION}\n\napple river stone"],
        "heldOutScenarios": [{"prompt": f"{QUESTION}\n\nisland lemon raven", "expect": "south"}],
    }
    running = start_ranks(
        tiny_model,
        tmp_path,
        stage=3,
        metrics=("eval_loss", "exact_match"),
        validation=validation,
        epochs=2,
    )
    rank1, rank0 = finish_all(running, timeout=420)
    assert [rank0.code, rank1.code] == [ExitCode.SUCCEEDED] * 2, rank0.log[-3000:] + rank1.log[-3000:]

    report = rank0.report()
    assert report["phase"] == "Succeeded"
    assert report["final"]["eval_loss"] < report["baseline"]["eval_loss"]
    # Task metrics and prompts come from generating with the sharded weights, on both ranks.
    assert report["final"]["exact_match"] > report["baseline"]["exact_match"] + 0.2
    assert "scenario_pass_rate" in report["final"]
    assert {c["name"] for c in report["predictions"]["checks"]} >= {"non_empty", "expected_answer"}
    assert sorted(p.name for p in (rank0.out / "prompts").iterdir()) == [
        "epoch-1.jsonl",
        "epoch-2.jsonl",
        "final.jsonl",
    ]
    assert not (rank1.out / "progress.json").exists()
    assert not (rank1.out / "final").exists() and not (rank1.out / "prompts").exists()

    # The artifact and the last checkpoint hold the gathered weights: they load with transformers,
    # agree, and answer the prompts exactly as the run's final diagnostic recorded.
    final = AutoModelForCausalLM.from_pretrained(rank0.out / "final")
    last = rank0.out / "checkpoints" / f"checkpoint-{report['progress']['step']}"
    checkpoint = AutoModelForCausalLM.from_pretrained(last)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    for name, weight in final.state_dict().items():
        assert weight.shape == base[name].shape, name
        assert torch.equal(weight, checkpoint.state_dict()[name]), name
    assert not all(torch.equal(w, base[n]) for n, w in final.state_dict().items())
    recorded = [json.loads(line) for line in (rank0.out / "prompts" / "final.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(rank0.out / "final")
    prompts = [evaluation.user_prompt(tokenizer, r["prompt"]) for r in recorded]
    outputs = evaluation.generate(final, tokenizer, prompts, max_new_tokens=8)
    assert [o.text for o in outputs] == [r["output"] for r in recorded] != ["", ""]


def test_restore_check_of_a_zero3_trainer_loads_the_checkpoint_whole(tiny_model: Path) -> None:
    """Rank 0 verifies checkpoints while the other ranks train: loading one must not partition it
    across the ranks, as transformers does for every model loaded in a ZeRO-3 process."""
    whole = RestoreCheck()(tiny_model)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    zero3 = HfDeepSpeedConfig(ds_config)  # type: ignore[no-untyped-call]  # kept: held by a weak reference
    try:
        assert is_deepspeed_zero3_enabled()  # type: ignore[no-untyped-call]
        assert RestoreCheck()(tiny_model) == pytest.approx(whole, rel=1e-5)
    finally:
        unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
        del zero3
