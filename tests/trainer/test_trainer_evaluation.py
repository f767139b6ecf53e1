"""Task metrics, the success-criteria gate and the predictions diagnostic."""

from __future__ import annotations

import random
import re
import string
from collections import Counter

import pytest
from rouge_score import rouge_scorer

from finetune_trainer.config import SuccessCriterion
from finetune_trainer.evaluation import Generation, check_criterion, diagnose, exact_match, rouge_l, token_f1


def test_text_metrics() -> None:
    assert exact_match("The River.", "river") == 1.0
    assert exact_match("river bank", "river") == 0.0
    assert token_f1("red river bank", "river bank") == pytest.approx(0.8)
    assert rouge_l("w x y z", "w y z") == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1))
    assert rouge_l("", "x") == 0.0


# --- the official SQuAD v1.1 evaluation script's functions, as the reference ----------------------------


def squad_normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text: str) -> str:
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def squad_f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = squad_normalize_answer(prediction).split()
    ground_truth_tokens = squad_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def squad_exact_match_score(prediction: str, ground_truth: str) -> bool:
    return squad_normalize_answer(prediction) == squad_normalize_answer(ground_truth)


PIECES = [
    *["river", "bank", "stone", "Paris", "paris", "PARIS", "north", "south", "42", "3.14", "co-op", "don't"],
    # Stemmed by ROUGE-L; "its" is not (3 letters), so it does not match "it".
    *["rivers", "banks", "running", "nations", "happily", "stoned", "its", "it"],
    *["a", "an", "the", "The", "AN", "A", "theory", "another", "banana"],  # articles, and words holding them
    *["the,", "(a)", "an.", "x-the", "a's"],
    *[",", ".", "!", "?", "'s", '"', "(", ")", "-", "...", ";", "%", "$"],
    *["café", "Café", "naïve", "Straße", "東京", "Москва", "İstanbul", "ǅ", "—", "«", "»", "…", "\ufe0f"],
    *["", " ", "\t", "\n", "\u00a0"],
]


def random_text(rng: random.Random) -> str:
    glue = rng.choice(["", " ", " ", "  "])
    return glue.join(rng.choice(PIECES) for _ in range(rng.randint(0, 8)))


def random_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """Random predictions and references, many sharing words (a prediction built from its reference)."""
    rng = random.Random(seed)
    pairs = [("", ""), ("", "the"), ("a", "the"), ("The.", "..."), ("river", ""), ("its", "it")]
    while len(pairs) < count:
        reference = random_text(rng)
        if rng.random() < 0.5:
            words = reference.split()
            rng.shuffle(words)
            kept = words[: rng.randint(0, len(words))]
            prediction = " ".join(w.upper() if rng.random() < 0.3 else w for w in kept) + random_text(rng)
        else:
            prediction = random_text(rng)
        pairs.append((prediction, reference))
    return pairs


PAIRS = random_pairs(400, seed=0)


def test_the_random_pairs_cover_what_normalization_handles() -> None:
    normalized = [squad_normalize_answer(p) for pair in PAIRS for p in pair]
    assert sum(n == "" for n in normalized) > 20
    assert sum(squad_exact_match_score(p, r) for p, r in PAIRS) > 20
    assert sum(0 < squad_f1_score(p, r) < 1 for p, r in PAIRS) > 60
    assert any(ch in "".join(normalized) for ch in "éß東М")


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_exact_match_and_f1_agree_with_the_squad_script(prediction: str, reference: str) -> None:
    assert exact_match(prediction, reference) == float(squad_exact_match_score(prediction, reference))
    if squad_normalize_answer(prediction) and squad_normalize_answer(reference):
        assert token_f1(prediction, reference) == pytest.approx(squad_f1_score(prediction, reference))
    else:  # SQuAD v2.0's rule: F1 agrees with exact match when either side is empty
        assert token_f1(prediction, reference) == float(squad_exact_match_score(prediction, reference))


@pytest.mark.parametrize(("prediction", "reference"), [p for p in PAIRS if p[0].isascii() and p[1].isascii()])
def test_rouge_l_is_rouge_score_with_stemming_on_english(prediction: str, reference: str) -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert rouge_l(prediction, reference) == pytest.approx(
        scorer.score(reference, prediction)["rougeL"].fmeasure
    )


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the rivers", "river", 2 * 0.5 * 1 / 1.5),  # stemmed: rivers = river
        ("Москва — столица России", "Столица России: Москва", 2 / 3),  # rouge-score's own tokens: none
        ("東京", "東京", 1.0),
        ("Straße", "strasse", 0.0),
        ("", "", 0.0),
    ],
)
def test_rouge_l_keeps_every_script(prediction: str, reference: str, expected: float) -> None:
    assert rouge_l(prediction, reference) == pytest.approx(expected)


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


def test_samples_put_the_base_and_tuned_answers_of_one_example_side_by_side() -> None:
    from finetune_trainer.evaluation import Answered, merge_samples

    name = "LATIN SMALL LETTER E WITH ACUTE"
    before = [Answered("Unicode name of 'é'?", name, "It is é.")]
    baseline = merge_samples([], before, "baseline")
    assert [(s.prompt, s.baseline, s.final) for s in baseline] == [("Unicode name of 'é'?", "It is é.", None)]
    after = [
        Answered("Unicode name of 'é'?", name, name),
        Answered("Unicode name of '!'?", "EXCLAMATION MARK", "EXCLAMATION MARK"),
    ]
    final = merge_samples(baseline, after, "final")
    assert [(s.baseline, s.final) for s in final] == [
        ("It is é.", name),
        (None, "EXCLAMATION MARK"),  # not answered before: the baseline stays empty, not borrowed
    ]
    many = [Answered(f"q{i}", "r", "o") for i in range(10)]
    assert len(merge_samples([], many, "baseline")) == 3
