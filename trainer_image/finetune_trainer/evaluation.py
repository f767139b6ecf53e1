"""Evaluation: task metrics from generations, the success-criteria gate and the predictions diagnostic."""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_trainer.config import Scenario, SuccessCriterion
from finetune_trainer.data.formats import Example, Message
from finetune_trainer.data.tokenization import render
from finetune_trainer.report_model import CheckResult, Predictions, Sample

LOWER_IS_BETTER = {"eval_loss", "perplexity", "wer"}
GENERATION_METRICS = ("exact_match", "token_f1", "rougeL")

# --- text metrics ----------------------------------------------------------------------------------------
# Exact match and token F1 follow the SQuAD evaluation script; ROUGE-L is rouge-score's; WER is jiwer's
# over text normalized as Whisper's evaluation normalizes it.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")  # rouge-score's [^a-z0-9]+, for every script


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1; when either side normalizes to nothing, 1.0 only if both do (SQuAD v2.0's
    rule: v1.1 scores that 0.0 while exact match scores it 1.0)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _RougeTokenizer:
    """rouge-score's default tokenization (lower case, split at non-alphanumerics, Porter stems of
    words over 3 characters), but keeping letters and digits of every script: the default keeps
    only a-z and 0-9, so a Cyrillic or Japanese answer would have no tokens and score 0."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words = _NOT_ALPHANUMERIC.sub(" ", text.lower()).split()
        return [self._stemmer.stem(w) if len(w) > 3 else w for w in words]


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) from rouge-score, with stemming so that
    "rivers" matches "river"; 0.0 when either side has no words."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def basic_normalizer() -> Callable[[str], str]:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    normalize: Callable[[str], str] = BasicTextNormalizer()
    return normalize


def word_error_rate(
    predictions: Sequence[str], references: Sequence[str], normalize: Callable[[str], str] | None = None
) -> float:
    """Corpus WER from jiwer: substitutions, deletions and insertions over all reference words, on
    text normalized by `normalize` (default: Whisper's BasicTextNormalizer: lower case, no
    punctuation or bracketed asides). With no reference words: 0.0, or 1.0 if anything was said."""
    import jiwer

    normalize = normalize or basic_normalizer()
    refs = [" ".join(normalize(r).split()) for r in references]
    hyps = [" ".join(normalize(p).split()) for p in predictions]
    if len(refs) != len(hyps):
        raise ValueError(f"{len(hyps)} transcriptions for {len(refs)} references")
    if not refs:
        return 0.0
    counts = jiwer.process_words(refs, hyps)
    errors = counts.substitutions + counts.deletions + counts.insertions
    words = counts.substitutions + counts.deletions + counts.hits
    return errors / words if words else float(errors > 0)


# --- generation ------------------------------------------------------------------------------------------

MAX_NEW_TOKENS_CAP = 256  # derived lengths stop here: each evaluation generates this many at most
MIN_MARGIN_TOKENS = 8
_TURN_PROBE = "Q7xZ2probe"  # content no template alters, to find what a template puts after it


@dataclass
class Generation:
    prompt: str
    text: str
    stopped: bool  # ended at one of the stop tokens (stop_token_ids) before max_new_tokens


def derived_max_new_tokens(
    configured: int | None, reference_tokens: Sequence[int], cap: int = MAX_NEW_TOKENS_CAP
) -> int:
    """validation.maxNewTokens when set; else the longest reference in tokens plus a quarter (at
    least MIN_MARGIN_TOKENS), at most `cap`; `cap` when there are no references."""
    if configured is not None:
        return configured
    if not reference_tokens:
        return cap
    longest = max(reference_tokens)
    return min(cap, longest + max(MIN_MARGIN_TOKENS, longest // 4))


def answer_tokens(tokenizer: Any, examples: Sequence[Example]) -> list[int]:
    """Each chat example's reference answer in the model's tokens, with its end-of-turn token."""
    answers = [e.answer() for e in examples if e.text is None]
    return [len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers]


def special_token_ids(tokenizer: Any) -> set[int]:
    """Named special tokens and added tokens marked special (Llama 3's <|eot_id|> is only the latter)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def end_of_turn_token(tokenizer: Any) -> int | None:
    """The special token the chat template puts right after an assistant turn (<|im_end|>,
    <|eot_id|>, <end_of_turn>, eos), found by rendering one turn; None when there is none."""
    turn: list[Message] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _TURN_PROBE}]
    try:
        rendered = render(tokenizer, turn)
    except Exception:  # no template, or one that refuses this conversation: no turn end to learn
        return None
    if _TURN_PROBE not in rendered:
        return None
    after = rendered[rendered.rindex(_TURN_PROBE) + len(_TURN_PROBE) :].lstrip()  # Llama 2: " </s>"
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return int(ids[0]) if ids and ids[0] in special_token_ids(tokenizer) else None


def stop_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """Every token that ends a generation: the model's generation_config eos (often a list), the
    chat template's end-of-turn token and the tokenizer's eos; base models of chat families end
    turns with a token their tokenizer's eos is not."""
    configured = getattr(generation_config, "eos_token_id", None)
    listed = list(configured) if isinstance(configured, list | tuple) else [configured]
    candidates = [*listed, end_of_turn_token(tokenizer), tokenizer.eos_token_id]
    return list(dict.fromkeys(int(i) for i in candidates if i is not None))


def pad_token_id(tokenizer: Any, stops: Sequence[int]) -> int:
    """The tokenizer's pad token, else eos, else unk: left padding is masked out, so any token works."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, *stops):
        if candidate is not None:
            return int(candidate)
    raise ValueError("tokenizer: no pad, eos or unk token (fix: set eos_token in tokenizer_config.json)")


def left_pad(sequences: Sequence[Sequence[int]], pad: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids padded on the left to one width, and their attention mask: a decoder continues
    from the last position, so the prompts must end together."""
    width = max((len(s) for s in sequences), default=0)
    ids = [[pad] * (width - len(s)) + list(s) for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return ids, mask


def until_stop(new_tokens: Sequence[int], stops: Collection[int]) -> tuple[list[int], bool]:
    """The generated tokens before the first stop token, and whether one came."""
    for i, token in enumerate(new_tokens):
        if token in stops:
            return list(new_tokens[:i]), True
    return list(new_tokens), False


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


def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8
) -> list[Generation]:
    """Greedy generations for rendered prompts, `batch_size` at a time, left-padded with an
    attention mask, ending at any of `stop_token_ids`; in the order of `prompts`.

    Prompts of similar length are batched together (less padding). On sharded weights every rank
    calls this with the same prompts, so every rank runs the same batches; `synced_gpus` keeps a
    rank whose batch has finished running forward passes until every rank's has."""
    import torch

    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad = pad_token_id(tokenizer, stops)
    device = next(model.parameters()).device
    synced = sharded(model)
    encoded = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: dict[int, Generation] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                ids, mask = left_pad([encoded[i] for i in batch], pad)
                input_ids = torch.tensor(ids, dtype=torch.long, device=device)
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.tensor(mask, dtype=torch.long, device=device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=pad,
                    eos_token_id=stops,
                    synced_gpus=synced,
                )
                for row, i in enumerate(batch):
                    kept, stopped = until_stop(out[row, input_ids.shape[1] :].tolist(), stops)
                    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                    results[i] = Generation(prompts[i], text, stopped)
    finally:
        model.train(was_training)
    return [results[i] for i in range(len(prompts))]


def user_prompt(tokenizer: Any, text: str) -> str:
    return render(tokenizer, [{"role": "user", "content": text}], generation_prompt=True)


def example_prompt(tokenizer: Any, example: Example) -> str:
    messages: list[Message] = example.prompt_messages()
    return render(tokenizer, messages, generation_prompt=True)


@dataclass(frozen=True)
class Answered:
    """A held-out example and what the model generated for it."""

    prompt: str  # the last user message, as a person would read it
    reference: str
    output: str


def answer_examples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    limit: int,
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[Answered]:
    chats = [e for e in examples if e.text is None][:limit]
    if not chats:
        return []
    prompts = [example_prompt(tokenizer, e) for e in chats]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [
        Answered(e.prompt_messages()[-1]["content"], e.answer(), o.text)
        for e, o in zip(chats, outputs, strict=True)
    ]


def score_answers(answers: Sequence[Answered]) -> dict[str, float]:
    if not answers:
        return {}
    scores = {name: 0.0 for name in GENERATION_METRICS}
    for a in answers:
        scores["exact_match"] += exact_match(a.output, a.reference)
        scores["token_f1"] += token_f1(a.output, a.reference)
        scores["rougeL"] += rouge_l(a.output, a.reference)
    return {name: total / len(answers) for name, total in scores.items()}


SAMPLE_COUNT = 3  # held-out answers shown in the job's status, before and after training


def merge_samples(samples: Sequence[Sample], answers: Sequence[Answered], phase: str) -> list[Sample]:
    """The first answers of this phase ("baseline" or "final") beside the other phase's answers to the
    same examples; an example the other phase did not answer starts a new sample."""
    known = {(x.prompt, x.reference): x for x in samples}
    merged = []
    for a in answers[:SAMPLE_COUNT]:
        sample = known.get((a.prompt, a.reference), Sample(prompt=a.prompt, reference=a.reference))
        merged.append(sample.model_copy(update={phase: a.output}))
    return merged


def scenario_pass_rate(
    model: Any, tokenizer: Any, scenarios: Sequence[Scenario], max_new_tokens: int, batch_size: int = 8
) -> dict[str, float]:
    if not scenarios:
        return {}
    prompts = [user_prompt(tokenizer, s.prompt) for s in scenarios]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
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
