"""`python -m finetune_trainer` against the real S3 server: preemption, kill -9, corrupt checkpoints.

Each rerun gets a fresh output folder, as a retried pod gets a fresh disk: whatever it resumes
from comes from the bucket.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.testing.cli import Result, Running, base_config, start_trainer
from finetune_trainer.testing.tiny import build_tiny_model, synthetic_dataset, write_jsonl
from localcluster.processes import free_port

MAX_STEPS, EVERY = 60, 10
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PROGRESS = re.compile(r"progress: (\{.*\})")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    data = write_jsonl(synthetic_dataset(160, seed=3), root / "train.jsonl")
    return build_tiny_model(root / "model"), data


def job_config(tiny: tuple[Path, Path], server: Any, bucket: str, out: Path, uid: str) -> dict[str, Any]:
    model, data = tiny
    config = base_config(
        model,
        data,
        out,
        "full",
        job={"uid": uid},
        goal={"metrics": ["eval_loss"], "heldOutTest": False},
        hyperparameters={
            "maxSteps": MAX_STEPS,
            "batchSize": 4,
            "learningRate": 1e-3,
            "loggingSteps": 1,
            "lrScheduler": "constant",
            "warmupRatio": 0.0,
        },
        checkpoints={
            "store": {
                "endpoint": server.endpoint,
                "region": "us-east-1",
                "bucket": bucket,
                "prefix": "jobs",
                "pathStyle": True,
            },
            "everySteps": EVERY,
            "keep": 3,
        },
        validation={"everyEpoch": False},
    )
    config["method"]["allowSmallDataFullFineTune"] = True
    config["dataset"]["split"] = {"validation": 0.0, "test": 0.0}
    return config


def start(config: dict[str, Any], tmp: Path, uid: str, name: str) -> Running:
    config = {**config, "outputDir": str(tmp / name / "out")}
    config["report"] = {"file": str(tmp / name / "out" / "progress.json")}
    return start_trainer(config, tmp / name, env={**ONE_THREAD, "JOB_ID": uid})


def committed_steps(s3: Any, bucket: str, uid: str) -> list[int]:
    prefix = f"jobs/ns/tiny-job/{uid}/checkpoints/"
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    found = (re.fullmatch(r"step-(\d+)/MANIFEST\.json", o["Key"].removeprefix(prefix)) for o in listing)
    return sorted(int(m.group(1)) for m in found if m)


def wait_for_commits(s3: Any, bucket: str, uid: str, count: int, run: Running) -> list[int]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.process.poll() is None:
        steps = committed_steps(s3, bucket, uid)
        if len(steps) >= count:
            return steps
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} checkpoints committed:\n{run.log()[-3000:]}")


def progress(result: Result) -> list[dict[str, Any]]:
    """Progress reports of one run, in order (the same documents the report file receives)."""
    return [json.loads(m.group(1)) for m in PROGRESS.finditer(result.log)]


def trained_steps(result: Result) -> list[int]:
    return [p["step"] for p in progress(result) if "loss" in p]


def restored_step(result: Result, uid: str) -> int:
    found = re.search(rf"restored checkpoint s3://\S+/{uid}/checkpoints/step-(\d+)", result.log)
    assert found, result.log[-3000:]
    return int(found.group(1))


def losses(result: Result) -> dict[int, float]:
    return {p["step"]: p["loss"] for p in progress(result) if "loss" in p}


def test_sigterm_commits_a_checkpoint_and_the_rerun_continues_where_it_stopped(
    tiny: tuple[Path, Path], s3_env: Any, s3: Any, bucket: str, tmp_path: Path
) -> None:
    uid = "uid-term"
    config = job_config(tiny, s3_env, bucket, tmp_path / "unused", uid)
    first = start(config, tmp_path, uid, "first")
    wait_for_commits(s3, bucket, uid, 1, first)  # training is under way past its first checkpoint
    first.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    stopped = first.finish(timeout=60)
    assert stopped.code == ExitCode.PREEMPTED_CHECKPOINTED, stopped.log[-3000:]
    assert time.monotonic() - signalled < 15, "the preemption checkpoint took too long"

    preempted_at = trained_steps(stopped)[-1]
    assert EVERY < preempted_at < MAX_STEPS
    assert committed_steps(s3, bucket, uid)[-1] == preempted_at, "the step it stopped at is committed"
    assert f"checkpoint of step {preempted_at} saved" in stopped.report()["message"]
    first_key = f"jobs/ns/tiny-job/{uid}/checkpoints/step-{EVERY}"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{first_key}/MANIFEST.json")["Body"].read())
    recorded = json.loads(
        s3.get_object(Bucket=bucket, Key=f"{first_key}/restore_fingerprint.json")["Body"].read()
    )
    assert manifest["restore_fingerprint"] == recorded, (
        "the live model's fingerprint is what verification checks"
    )
    assert s3.get_object(Bucket=bucket, Key=f"{first_key}/VERIFIED")["ContentLength"] > 0

    resumed = start(config, tmp_path, uid, "second").finish()
    assert resumed.code == ExitCode.SUCCEEDED, resumed.log[-3000:]
    assert restored_step(resumed, uid) == preempted_at
    steps = trained_steps(resumed)
    assert steps == list(range(preempted_at + 1, MAX_STEPS + 1)), "each remaining step once, none again"
    assert progress(resumed)[0]["step"] > preempted_at
    state = json.loads(
        (resumed.out / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text()
    )
    assert state["global_step"] == MAX_STEPS
    assert resumed.report()["checkpoint"]["uri"].endswith(f"/{uid}/checkpoints/final")

    # The resumed run sees the same batches with the same optimizer state as an uninterrupted one.
    reference = start(
        job_config(tiny, s3_env, bucket, tmp_path, "uid-ref"), tmp_path, "uid-ref", "ref"
    ).finish()
    assert reference.code == ExitCode.SUCCEEDED, reference.log[-3000:]
    expected = losses(reference)
    for step, loss in losses(resumed).items():
        assert loss == pytest.approx(expected[step], rel=1e-3), f"step {step}"


def test_lora_on_two_gpus_of_a_pod_commits_both_ranks_and_resumes_on_both(
    tiny: tuple[Path, Path], s3_env: Any, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """DDP: SIGTERM to the pod reaches both ranks; each stores its part of the same step, rank 0
    commits it, and the next pod's two ranks both resume from it and run each remaining step once."""
    uid = "uid-ddp"
    config = job_config(tiny, s3_env, bucket, tmp_path / "unused", uid)
    config["method"] = {"type": "lora", "reason": "test"}
    pod = {"NPROC_PER_NODE": "2", "POD_IP": "127.0.0.1", "MASTER_PORT": str(free_port())}

    def start_pod(name: str) -> Running:
        run = {**config, "outputDir": str(tmp_path / name / "out")}
        run["report"] = {"file": str(tmp_path / name / "out" / "progress.json")}
        return start_trainer(run, tmp_path / name, env={**ONE_THREAD, "JOB_ID": uid, **pod})

    first = start_pod("first")
    wait_for_commits(s3, bucket, uid, 1, first)
    first.process.send_signal(signal.SIGTERM)
    stopped = first.finish(timeout=120)
    assert stopped.code == ExitCode.PREEMPTED_CHECKPOINTED, stopped.log[-3000:]
    stored = re.findall(r"rank (\d) stored its \d+ files of step (\d+)", stopped.log)
    preempted_at = committed_steps(s3, bucket, uid)[-1]
    assert {("0", str(preempted_at)), ("1", str(preempted_at))} <= set(stored), stored
    manifest = json.loads(
        s3.get_object(
            Bucket=bucket, Key=f"jobs/ns/tiny-job/{uid}/checkpoints/step-{preempted_at}/MANIFEST.json"
        )["Body"].read()
    )
    assert manifest["world_size"] == 2
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {f["path"] for f in manifest["files"]}

    resumed = start_pod("second").finish(timeout=300)
    assert resumed.code == ExitCode.SUCCEEDED, resumed.log[-3000:]
    assert restored_step(resumed, uid) == preempted_at
    assert f"rank 1 resumes from checkpoint-{preempted_at}" in resumed.log
    rank0 = [p["step"] for p in progress(resumed) if "loss" in p]
    assert sorted(set(rank0)) == list(range(preempted_at + 1, MAX_STEPS + 1)), rank0


def test_kill_9_resumes_from_the_newest_committed_checkpoint(
    tiny: tuple[Path, Path], s3_env: Any, s3: Any, bucket: str, tmp_path: Path
) -> None:
    uid = "uid-kill"
    config = job_config(tiny, s3_env, bucket, tmp_path / "unused", uid)
    first = start(config, tmp_path, uid, "first")
    wait_for_commits(s3, bucket, uid, 2, first)
    first.process.send_signal(signal.SIGKILL)
    assert first.finish(timeout=30).code == -signal.SIGKILL
    newest = committed_steps(s3, bucket, uid)[-1]

    resumed = start(config, tmp_path, uid, "second").finish()
    assert resumed.code == ExitCode.SUCCEEDED, resumed.log[-3000:]
    assert restored_step(resumed, uid) == newest
    assert trained_steps(resumed) == list(range(newest + 1, MAX_STEPS + 1))


def test_a_corrupt_newest_checkpoint_is_skipped_with_its_reason(
    tiny: tuple[Path, Path], s3_env: Any, s3: Any, bucket: str, tmp_path: Path
) -> None:
    uid = "uid-corrupt"
    config = job_config(tiny, s3_env, bucket, tmp_path / "unused", uid)
    first = start(config, tmp_path, uid, "first")
    wait_for_commits(s3, bucket, uid, 2, first)
    first.process.send_signal(signal.SIGKILL)
    first.finish(timeout=30)
    *_, previous, newest = committed_steps(s3, bucket, uid)
    key = f"jobs/ns/tiny-job/{uid}/checkpoints/step-{newest}/model.safetensors"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF  # same size, different bytes: only the sha256 tells
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    resumed = start(config, tmp_path, uid, "second").finish()
    assert resumed.code == ExitCode.SUCCEEDED, resumed.log[-3000:]
    assert restored_step(resumed, uid) == previous
    message = resumed.report()["message"]
    assert f"s3://{bucket}/{key.rsplit('/', 1)[0]} skipped" in message
    assert "model.safetensors: sha256" in message
    problems = resumed.report()["checkpointProblems"]
    assert [(p["uri"], p["problem"]) for p in problems] == [
        (f"s3://{bucket}/{key.rsplit('/', 1)[0]}", "skipped")
    ]
    assert "sha256" in problems[0]["reason"]
    assert trained_steps(resumed)[0] == previous + 1


def test_wrong_credentials_stop_before_training_with_the_fix(
    tiny: tuple[Path, Path], s3_env: Any, bucket: str, tmp_path: Path
) -> None:
    wrong = "wrong-" + s3_env.secret_key[::-1]
    config = job_config(tiny, s3_env, bucket, tmp_path / "unused", "uid-creds")
    bad = start_trainer(
        {**config, "outputDir": str(tmp_path / "out"), "report": {"file": str(tmp_path / "report.json")}},
        tmp_path,
        env={**ONE_THREAD, "JOB_ID": "uid-creds", "AWS_SECRET_ACCESS_KEY": wrong},
    ).finish(timeout=120)
    assert bad.code == ExitCode.STORE_REFUSED, bad.log[-3000:]  # final: the Job does not retry it
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["phase"] == "Failed"
    assert f"bucket {bucket!r} at {s3_env.endpoint}" in report["message"]
    assert "was refused (SignatureDoesNotMatch" in report["message"]
    assert "fix: correct the access key id and secret access key" in report["message"]
    assert "progress:" not in bad.log, "no training step before the store is usable"
    assert wrong not in bad.log + report["message"]
