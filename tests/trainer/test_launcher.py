"""One process per GPU in a pod: what each rank is told, how the pod's exit code is chosen, and
what happens to the other ranks when one fails or the pod is told to stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from finetune_trainer.config import ConfigError
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.launcher import Exit, Plan, plan_from_env, pod_exit_code, rank_env


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"NPROC_PER_NODE": "1"}, None),
        ({"NPROC_PER_NODE": "4", "LOCAL_RANK": "0"}, None),  # already a rank
        ({"NPROC_PER_NODE": "4", "POD_IP": "10.0.0.7"}, Plan(4, 1, 0, "10.0.0.7", 29500)),
        ({"NPROC_PER_NODE": "2"}, Plan(2, 1, 0, "127.0.0.1", 29500)),
        (
            {
                "NPROC_PER_NODE": "8",
                "NNODES": "2",
                "NODE_RANK": "1",
                "MASTER_ADDR": "j-0.j",
                "MASTER_PORT": "29501",
            },
            Plan(8, 2, 1, "j-0.j", 29501),
        ),
    ],
)
def test_plan_from_the_operator_env(env: dict[str, str], expected: Plan | None) -> None:
    assert plan_from_env(env) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NPROC_PER_NODE": "two"}, "env NPROC_PER_NODE: got 'two': must be an integer >= 1"),
        ({"NPROC_PER_NODE": "0"}, "env NPROC_PER_NODE: got '0': must be an integer >= 1"),
        (
            {"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "2"},
            "env NODE_RANK: got 2: must be below NNODES 2",
        ),
    ],
)
def test_bad_launcher_env_names_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        plan_from_env(env)
    assert caught.value.messages[0].startswith(expected)
    assert "fix:" in caught.value.messages[0]


@pytest.mark.parametrize(
    ("plan", "local_rank", "rank", "world"),
    [
        (Plan(1, 1, 0, "a", 1), 0, "0", "1"),
        (Plan(4, 1, 0, "a", 1), 3, "3", "4"),
        (Plan(8, 2, 1, "a", 1), 5, "13", "16"),
    ],
)
def test_each_rank_is_told_its_place(plan: Plan, local_rank: int, rank: str, world: str) -> None:
    env = rank_env(plan, local_rank)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == (rank, str(local_rank), world)
    assert env["LOCAL_WORLD_SIZE"] == str(plan.procs) and env["NODE_RANK"] == str(plan.node_rank)


D, P, OUT = ExitCode.DIVERGED, ExitCode.PREEMPTED_CHECKPOINTED, ExitCode.PREEMPTED_OUTSIDE_TRAINING


@pytest.mark.parametrize(
    ("exits", "code"),
    [
        ([Exit(1, 0), Exit(0, 0)], 0),
        # Rank 1 diverged; rank 0 was stopped because of it and exited 76: the pod diverged.
        ([Exit(1, D), Exit(0, OUT, stopped_by_launcher=True)], D),
        # Rank 0 ran out of memory (SIGKILL), the launcher stopped rank 1.
        ([Exit(0, -9), Exit(1, -15, stopped_by_launcher=True)], 137),
        # The pod got SIGTERM: every rank saved its part.
        ([Exit(1, P), Exit(0, P)], P),
        # Only the ranks the launcher stopped failed (the failing one exited 0 at the end).
        ([Exit(0, 0), Exit(1, -9, stopped_by_launcher=True)], 137),
    ],
)
def test_the_pod_exit_code_is_the_first_rank_that_failed_on_its_own(exits: list[Exit], code: int) -> None:
    assert pod_exit_code(exits) == code


# A rank: rank 1 fails at once with the code in argv; rank 0 runs until SIGTERM, then exits 76.
RANK = """
import os, signal, sys, time

def stop(signum, frame):
    print(f"rank {os.environ['RANK']} got SIGTERM", flush=True)
    sys.exit(76)

signal.signal(signal.SIGTERM, stop)
print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} started", flush=True)
if os.environ["LOCAL_RANK"] == "1" and sys.argv[1] != "0":
    time.sleep(1)
    sys.exit(int(sys.argv[1]))
time.sleep(60)
"""


def run_launcher(tmp_path: Path, fail_code: int, signal_after: float | None = None) -> tuple[int, str, float]:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    code = (
        "import sys; from finetune_trainer.launcher import Launcher, Plan\n"
        f"sys.exit(Launcher(Plan(2, 1, 0, '127.0.0.1', 1), ['{fail_code}'], {{}}, "
        f"[sys.executable, {str(script)!r}]).run())"
    )
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if signal_after is not None:
        threading.Timer(signal_after, process.send_signal, (signal.SIGTERM,)).start()
    out, _ = process.communicate(timeout=120)
    return process.returncode, out, time.monotonic() - started


def test_a_failed_rank_stops_the_others_and_names_the_pods_end(tmp_path: Path) -> None:
    code, out, elapsed = run_launcher(tmp_path, int(D))
    assert code == D, out
    assert "rank 0 got SIGTERM" in out and "rank process 1 ended with code 6: stopping the others" in out
    assert elapsed < 30, "the healthy rank must not wait out its sleep"


def test_sigterm_to_the_pod_reaches_every_rank(tmp_path: Path) -> None:
    code, out, _ = run_launcher(tmp_path, 0, signal_after=3.0)
    assert "rank 0 of 2 started" in out and "rank 1 of 2 started" in out, out
    assert "rank 0 got SIGTERM" in out and "rank 1 got SIGTERM" in out, out
    assert code == OUT, out
