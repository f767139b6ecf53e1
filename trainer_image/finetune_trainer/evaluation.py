"""Evaluation: task metrics from generations, the success-criteria gate and the predictions diagnostic."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_trainer.config import Scenario, SuccessCriterion
from finetune_trainer.data.formats import Example, Message
from finetune_trainer.data.tokenization import render
from finetune_trainer.report_model import CheckResult, Predictions

LOWER_IS_BETTER = {"eval_loss", "perplexity", "wer"}
GENERATION_METRICS = ("exact_match", "token_f1", "rougeL")

# --- text metrics (SQuAD-style normalization) ------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over normalized tokens (longest common subsequence)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _edit_distance(hypothesis: Sequence[str], reference: Sequence[str]) -> int:
    previous = list(range(len(reference) + 1))
    for i, word in enumerate(hypothesis, start=1):
        current = [i]
        for j, ref in enumerate(reference, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != ref)))
        previous = current
    return previous[-1]


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER: word substitutions, insertions and deletions over reference words (normalized text)."""
    errors = words = 0
    for prediction, reference in zip(predictions, references, strict=True):
        ref = normalize_answer(reference).split()
        errors += _edit_distance(normalize_answer(prediction).split(), ref)
        words += len(ref)
    return errors / words if words else float(errors > 0)


# --- generation ------------------------------------------------------------------------------------------


@dataclass
class Generation:
    prompt: str
    text: str
    stopped: bool  # ended with EOS before max_new_tokens


def sharded(model: Any) -> bool:
    """Whether ZeRO-3 splits the model's weights across processes. Each forward pass then gathers
    them from every rank, so every rank must run the same forward passes, in the same order."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return False
    return hasattr(next(model.parameters()), "ds_id")  # set on every parameter ZeRO-3 partitions


def finished_everywhere(finished: bool, synced: bool, device: Any) -> bool:
    """Whether generation may stop: on sharded weights, only once every rank has finished, since a
    rank that stops early leaves the others waiting for its share of the weights."""
    if not synced:
        return finished
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(finished)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
    """Greedy generations for rendered prompts, one at a time (no padding effects).

    On sharded weights every rank calls this with the same prompts; `synced_gpus` keeps a rank
    that reached EOS running forward passes until every rank has finished its prompt."""
    import torch

    was_training = model.training
    model.eval()
    results = []
    device = next(model.parameters()).device
    synced = sharded(model)
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced,
            )
            new = out[0, ids.shape[1] :].tolist()
            stopped = tokenizer.eos_token_id in new
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            results.append(Generation(prompt, text, stopped))
    if was_training:
        model.train()
    return results


def user_prompt(tokenizer: Any, text: str) -> str:
    return render(tokenizer, [{"role": "user", "content": text}], generation_prompt=True)


def example_prompt(tokenizer: Any, example: Example) -> str:
    messages: list[Message] = example.prompt_messages()
    return render(tokenizer, messages, generation_prompt=True)


def generation_metrics(
    model: Any, tokenizer: Any, examples: Sequence[Example], limit: int, max_new_tokens: int
) -> dict[str, float]:
    chats = [e for e in examples if e.text is None][:limit]
    if not chats:
        return {}
    outputs = generate(model, tokenizer, [example_prompt(tokenizer, e) for e in chats], max_new_tokens)
    scores = {name: 0.0 for name in GENERATION_METRICS}
    for example, output in zip(chats, outputs, strict=True):
        scores["exact_match"] += exact_match(output.text, example.answer())
        scores["token_f1"] += token_f1(output.text, example.answer())
        scores["rougeL"] += rouge_l(output.text, example.answer())
    return {name: total / len(chats) for name, total in scores.items()}


def scenario_pass_rate(
    model: Any, tokenizer: Any, scenarios: Sequence[Scenario], max_new_tokens: int
) -> dict[str, float]:
    if not scenarios:
        return {}
    outputs = generate(
        model, tokenizer, [user_prompt(tokenizer, s.prompt) for s in scenarios], max_new_tokens
    )
    passed = sum(s.expect.lower() in o.text.lower() for s, o in zip(scenarios, outputs, strict=True))
    return {"scenario_pass_rate": passed / len(scenarios)}


def loss_metrics(eval_loss: float) -> dict[str, float]:
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}


# --- success criteria ------------------------------------------------------------------------------------


@dataclass
class CriterionResult:
    criterion: SuccessCriterion
    passed: bool
    reason: str


def _improvement(metric: str, baseline: float, final: float) -> float:
    return baseline - final if metric in LOWER_IS_BETTER else final - baseline


def check_criterion(
    c: SuccessCriterion, baseline: Mapping[str, float], final: Mapping[str, float]
) -> CriterionResult:
    if c.metric not in final:
        return CriterionResult(c, False, f"{c.metric} was not measured (fix: add it to goal.metrics)")
    value = final[c.metric]
    if c.at_least is not None:
        return CriterionResult(c, value >= c.at_least, f"{c.metric} {value:.4g} (atLeast {c.at_least:g})")
    if c.at_most is not None:
        return CriterionResult(c, value <= c.at_most, f"{c.metric} {value:.4g} (atMost {c.at_most:g})")
    if c.metric not in baseline:
        return CriterionResult(c, False, f"{c.metric} has no baseline (fix: goal.heldOutTest: true)")
    gain = _improvement(c.metric, baseline[c.metric], value)
    where = f"{c.metric} {baseline[c.metric]:.4g} -> {value:.4g}"
    if c.max_regression is not None:
        return CriterionResult(c, -gain <= c.max_regression, f"{where} (maxRegression {c.max_regression:g})")
    assert c.min_improvement is not None  # the config allows exactly one rule
    return CriterionResult(c, gain >= c.min_improvement, f"{where} (minImprovement {c.min_improvement:g})")


def check_criteria(
    criteria: Sequence[SuccessCriterion], baseline: Mapping[str, float], final: Mapping[str, float]
) -> list[CriterionResult]:
    return [check_criterion(c, baseline, final) for c in criteria]


# --- predictions diagnostic ------------------------------------------------------------------------------

MIN_DISTINCT_TRIGRAMS = 0.3
MIN_ECHO_CHARS = 20


def _repetitive(text: str) -> bool:
    words = text.split()
    if len(words) < 12:
        return len(words) >= 4 and len(set(words)) == 1
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(trigrams)) / len(trigrams) < MIN_DISTINCT_TRIGRAMS


def _echoes(prompt_text: str, output: str) -> bool:
    prompt_text = " ".join(prompt_text.split())
    return len(prompt_text) >= MIN_ECHO_CHARS and prompt_text.lower() in " ".join(output.split()).lower()


def diagnose(
    prompts: Sequence[str], outputs: Sequence[Generation], expected: Sequence[str | None]
) -> Predictions:
    """Sanity checks on sample generations, each named; a check passes when every sample passes it."""
    checks: dict[str, list[bool]] = {
        "non_empty": [],
        "not_repetitive": [],
        "no_prompt_echo": [],
        "within_length": [],
    }
    for prompt_text, output, expect in zip(prompts, outputs, expected, strict=True):
        checks["non_empty"].append(bool(output.text.strip()))
        checks["not_repetitive"].append(not _repetitive(output.text))
        checks["no_prompt_echo"].append(not _echoes(prompt_text, output.text))
        checks["within_length"].append(output.stopped)
        if expect is not None:
            checks.setdefault("expected_answer", []).append(expect.lower() in output.text.lower())
    results = [CheckResult(name=name, passed=all(values)) for name, values in checks.items() if values]
    passed = sum(r.passed for r in results)
    return Predictions(passed=passed, failed=len(results) - passed, checks=results)
