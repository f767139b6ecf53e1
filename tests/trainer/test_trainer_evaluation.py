"""Task metrics, the success-criteria gate and the predictions diagnostic."""

from __future__ import annotations

import pytest

from finetune_trainer.config import SuccessCriterion
from finetune_trainer.evaluation import Generation, check_criterion, diagnose, exact_match, rouge_l, token_f1


def test_text_metrics() -> None:
    assert exact_match("The River.", "river") == 1.0
    assert exact_match("river bank", "river") == 0.0
    assert token_f1("red river bank", "river bank") == pytest.approx(0.8)
    assert rouge_l("w x y z", "w y z") == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1))
    assert rouge_l("", "x") == 0.0


@pytest.mark.parametrize(
    ("rule", "baseline", "final", "passed"),
    [
        ({"metric": "eval_loss", "maxRegression": 0.0}, 2.0, 1.5, True),
        ({"metric": "eval_loss", "maxRegression": 0.0}, 2.0, 2.1, False),
        ({"metric": "eval_loss", "maxRegression": 0.2}, 2.0, 2.1, True),
        ({"metric": "exact_match", "minImprovement": 0.1}, 0.2, 0.35, True),
        ({"metric": "exact_match", "minImprovement": 0.1}, 0.2, 0.25, False),
        ({"metric": "rougeL", "atLeast": 0.5}, 0.0, 0.4, False),
        ({"metric": "perplexity", "atMost": 10.0}, 50.0, 9.0, True),
    ],
)
def test_success_criteria(rule: dict[str, object], baseline: float, final: float, passed: bool) -> None:
    criterion = SuccessCriterion.model_validate(rule)
    metric = criterion.metric
    result = check_criterion(criterion, {metric: baseline}, {metric: final})
    assert result.passed is passed
    assert metric in result.reason


def test_unmeasured_metric_fails_with_a_fix() -> None:
    criterion = SuccessCriterion(metric="token_f1", min_improvement=0.1)
    result = check_criterion(criterion, {}, {"eval_loss": 1.0})
    assert not result.passed
    assert "goal.metrics" in result.reason


def test_predictions_diagnostic_names_each_failed_check() -> None:
    prompts = ["Which word comes last? apple river stone", "Say hi", "Describe the weather today in detail"]
    outputs = [
        Generation(prompts[0], "stone", stopped=True),
        Generation(prompts[1], "", stopped=True),
        Generation(prompts[2], "rain " * 20, stopped=False),
    ]
    result = diagnose(prompts, outputs, ["stone", None, None])
    checks = {c.name: c.passed for c in result.checks}
    assert checks == {
        "non_empty": False,
        "not_repetitive": False,
        "no_prompt_echo": True,
        "within_length": False,
        "expected_answer": True,
    }
    assert (result.passed, result.failed) == (2, 3)


def test_prompt_echo_is_caught() -> None:
    prompt = "Which word comes last? apple river stone"
    result = diagnose([prompt], [Generation(prompt, prompt + " stone", True)], [None])
    assert {c.name: c.passed for c in result.checks}["no_prompt_echo"] is False
