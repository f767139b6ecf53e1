"""Where a trainer process sits in a multi-pod job, and DeepSpeed ZeRO-2 as two processes on CPU."""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest

from finetune_trainer.config import ConfigError
from finetune_trainer.distributed import SINGLE, rendezvous_from_env
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.testing.cli import Running, base_config, start_trainer
from finetune_trainer.testing.tiny import synthetic_dataset, write_jsonl

# What the operator sets on pod <job>-1 of a two-node job with one GPU per node.
OPERATOR_ENV = {
    "NNODES": "2",
    "NODE_RANK": "1",
    "WORLD_SIZE": "2",
    "MASTER_ADDR": "job-0.job-workers",
    "MASTER_PORT": "29500",
}


@pytest.mark.parametrize(
    ("env", "cuda_devices", "rank", "world"),
    [
        ({}, 0, 0, 1),
        (OPERATOR_ENV, 0, 1, 2),
        (OPERATOR_ENV | {"NODE_RANK": "0"}, 1, 0, 2),
        # gpusPerNode 4 without GPUs: one process per pod.
        (OPERATOR_ENV | {"WORLD_SIZE": "8"}, 0, 1, 2),
        # gpusPerNode 4 under torchrun: the fourth GPU's process of the second pod.
        (OPERATOR_ENV | {"WORLD_SIZE": "8", "LOCAL_RANK": "3"}, 4, 7, 8),
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
    ],
)
def test_bad_rendezvous_env_names_the_variable_and_value(change: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rendezvous_from_env(OPERATOR_ENV | change, 0)
    assert caught.value.messages[0].startswith(expected)
    assert "fix:" in caught.value.messages[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ranks(model: Path, tmp_path: Path, **hyperparameters: object) -> list[Running]:
    """Two trainer processes of one job, rank 1 first (it waits for rank 0 to evaluate the baseline)."""
    data = write_jsonl(synthetic_dataset(600, seed=0), tmp_path / "train.jsonl")
    local = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    env = OPERATOR_ENV | local
    running = []
    for rank in (1, 0):
        out = tmp_path / f"rank{rank}"
        config = base_config(
            model,
            data,
            out,
            "full",
            goal={"metrics": ["eval_loss"], "successCriteria": [{"metric": "eval_loss", "maxRegression": 0}]},
            hyperparameters={"batchSize": 8, "learningRate": 3e-3, "loggingSteps": 5, **hyperparameters},
            checkpoints={"everySteps": 10},
        )
        config["method"] |= {"allowSmallDataFullFineTune": True, "deepspeed": {"enabled": True, "stage": 2}}
        running.append(start_trainer(config, out, env | {"NODE_RANK": str(rank)}))
    return running


def test_zero2_trains_as_two_processes_and_only_rank_0_reports(tiny_model: Path, tmp_path: Path) -> None:
    running = start_ranks(tiny_model, tmp_path, maxSteps=20)
    results = [r.finish(timeout=300) for r in running]
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


def test_sigterm_to_one_pod_stops_both_ranks_at_the_same_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    rank1, rank0 = start_ranks(tiny_model, tmp_path, maxSteps=400)
    rank1.wait_for(r'progress: \{"step":5,', timeout=240)
    rank1.process.send_signal(signal.SIGTERM)
    results = [r.finish(timeout=240) for r in (rank1, rank0)]
    assert [r.code for r in results] == [ExitCode.PREEMPTED_CHECKPOINTED] * 2, results[1].log[-3000:]
    saved = [sorted(p.name for p in (r.out / "checkpoints").glob("checkpoint-*")) for r in results]
    assert saved[0] == saved[1] and saved[0], saved
    assert "preempted: checkpoint of step" in json.dumps(results[1].report())
