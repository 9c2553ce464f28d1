"""Tokenise normalised task splits into model-ready columns, and collate them into batches.

Encoding choices (one per example layout):

* **single sentence** (cola, sst2): ``tokenizer(text)``, the standard GLUE classification input.
* **sentence pair** (mrpc, stsb, qqp, mnli, qnli, rte, wnli, cb, boolq): ``tokenizer(text, text_pair)``
  so the model sees both segments separated by its own separator (and segment ids where it has
  them). boolq puts the short question first and the passage second, so truncation
  (``longest_first``) shortens the passage rather than the question. stsb is regression: its
  ``labels`` are float32 scores for a single-output head (MSE loss).
* **wic** (word in context): ``tokenizer(f"{word}: {sentence1}", sentence2)``: the target word
  leads the first segment, so the classifier knows which word's senses to compare.
* **copa** (multiple choice, for ``AutoModelForMultipleChoice``): every example yields two
  sequences, one per choice. Segment one is the premise with its final punctuation replaced by a
  connective that states the relation asked for (``" because"`` for *cause*, ``" so"`` for
  *effect*), segment two is the choice with its first letter lower-cased (kept for "I" and
  acronyms), so each sequence reads as one sentence: "The man turned on the faucet so" / "water
  flowed from the spout." The model scores both and a softmax over the two picks the answer,
  which is how COPA is usually fine-tuned with encoders. Columns hold ``[2, len]`` lists.
* **wsc** (span task as pair classification): the candidate noun phrase (``span1``) is wrapped in
  ``*...*`` and the pronoun (``span2``) in ``#...#`` at their word positions in ``text.split()``,
  and the second segment asks ``"Does {pronoun} refer to {candidate}?"``. The markers tell the
  encoder *which* mention is meant (the same pronoun often occurs several times) and the question
  restates the pair in words, so a plain sequence classifier can answer yes (1) / no (0). If a
  span's words do not sit at its index (a few official rows are off), the nearest occurrence of
  the span text is marked instead.

Nothing is padded here (truncation to ``max_length`` only): :func:`collator_for` pads each batch to
its own longest sequence, which is much cheaper than padding everything to ``max_length``.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from sam_peft.tasks.specs import CHOICE, PAIR, SINGLE, SPANS, WORD_PAIR, TaskSpec, resolve_task

__all__ = ["MultipleChoiceCollator", "collator_for", "copa_segments", "encode", "mark_wsc_spans"]

logger = logging.getLogger(__name__)

_REQUIRED = {
    SINGLE: ("text", "label"),
    PAIR: ("text", "text_pair", "label"),
    CHOICE: ("premise", "choice1", "choice2", "question", "label"),
    SPANS: ("text", "span1_text", "span1_index", "span2_text", "span2_index", "label"),
    WORD_PAIR: ("word", "text", "text_pair", "label"),
}
_CONNECTIVES = {"cause": "because", "effect": "so"}


def _lower_first(sentence: str) -> str:
    """Lower-case the first letter unless the first word is "I" (or "I'm", ...) or an acronym."""
    first = sentence.split(" ", 1)[0]
    if not first or first == "I" or first.startswith("I'") or (len(first) > 1 and first[:2].isupper()):
        return sentence
    return sentence[0].lower() + sentence[1:]


def copa_segments(premise: str, question: str, choice: str) -> tuple[str, str]:
    """The two segments of one COPA choice: ``("<premise> because|so", "<choice, lower-cased>")``."""
    if question not in _CONNECTIVES:
        raise ValueError(f"COPA question must be 'cause' or 'effect', got {question!r}.")
    stem = premise.rstrip()
    if stem and stem[-1] in ".!?":
        stem = stem[:-1]
    return f"{stem} {_CONNECTIVES[question]}", _lower_first(choice.strip())


def _normalise_word(word: str) -> str:
    return word.strip(string.punctuation).lower()


def _locate(words: list[str], span: list[str], index: int) -> int:
    """Start of ``span`` in ``words``: ``index`` if the words match there, else the nearest match."""
    target = [_normalise_word(w) for w in span]
    matches = [
        i
        for i in range(len(words) - len(span) + 1)
        if [_normalise_word(w) for w in words[i : i + len(span)]] == target
    ]
    if index in matches or (not matches and 0 <= index < len(words)):
        return index
    if not matches:
        raise ValueError(
            f"WSC span {' '.join(span)!r} is neither at word {index} nor anywhere in the text "
            f"({len(words)} words); the example is malformed."
        )
    return min(matches, key=lambda i: abs(i - index))


def mark_wsc_spans(text: str, span1_text: str, span1_index: int, span2_text: str, span2_index: int) -> str:
    """Wrap span1 (candidate) in ``*...*`` and span2 (pronoun) in ``#...#`` inside ``text``."""
    words = text.split()
    for span_text, index, mark in ((span1_text, span1_index, "*"), (span2_text, span2_index, "#")):
        span = span_text.split() or [span_text]
        start = _locate(words, span, index)
        end = min(start + len(span), len(words)) - 1
        words[start] = mark + words[start]
        words[end] = words[end] + mark
    return " ".join(words)


def _segments(spec: TaskSpec, batch: dict[str, list]) -> tuple[list[str], list[str] | None, int]:
    """First segments, second segments (or None) and the number of sequences per example."""
    if spec.layout == SINGLE:
        return batch["text"], None, 1
    if spec.layout == PAIR:
        return batch["text"], batch["text_pair"], 1
    if spec.layout == WORD_PAIR:
        firsts = [f"{word}: {text}" for word, text in zip(batch["word"], batch["text"], strict=True)]
        return firsts, batch["text_pair"], 1
    if spec.layout == CHOICE:
        firsts, seconds = [], []
        for premise, question, *choices in zip(
            batch["premise"], batch["question"], batch["choice1"], batch["choice2"], strict=True
        ):
            for choice in choices:
                first, second = copa_segments(premise, question, choice)
                firsts.append(first)
                seconds.append(second)
        return firsts, seconds, 2
    marked, questions = [], []
    for text, s1, i1, s2, i2 in zip(
        batch["text"],
        batch["span1_text"],
        batch["span1_index"],
        batch["span2_text"],
        batch["span2_index"],
        strict=True,
    ):
        marked.append(mark_wsc_spans(text, s1, i1, s2, i2))
        questions.append(f"Does {s2} refer to {s1}?")
    return marked, questions, 1


def encode(
    task: str | TaskSpec, tokenizer: PreTrainedTokenizerBase, dataset: datasets.Dataset, max_length: int = 128
) -> datasets.Dataset:
    """Tokenise one normalised split (from :func:`~sam_peft.tasks.load_task`) without padding.

    Returns a dataset with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
    tokenizer produces them) plus ``labels`` (float32 for stsb, int64 otherwise); for copa each of
    these token columns holds two sequences per example. All other columns are dropped.
    """
    spec = resolve_task(task)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
        raise ValueError(f"max_length must be an integer >= 8, got {max_length!r}; 128 suits GLUE.")
    missing = [c for c in _REQUIRED[spec.layout] if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Dataset for {spec.name!r} lacks columns {missing} (has {dataset.column_names}); "
            "pass a split returned by sam_peft.tasks.load_task."
        )

    def tokenise(batch: dict[str, list]) -> dict[str, Any]:
        firsts, seconds, per_example = _segments(spec, batch)
        enc = dict(tokenizer(firsts, seconds, truncation=True, max_length=max_length))
        if per_example > 1:
            enc = {k: [v[i : i + per_example] for i in range(0, len(v), per_example)] for k, v in enc.items()}
        enc["labels"] = batch["label"]
        return enc

    encoded = dataset.map(
        tokenise, batched=True, remove_columns=dataset.column_names, desc=f"Tokenising {spec.name}"
    )
    label_type = "float32" if spec.is_regression else "int64"
    return encoded.cast_column("labels", datasets.Value(label_type))


class MultipleChoiceCollator:
    """Pad features whose token columns hold ``num_choices`` sequences into ``[B, num_choices, L]``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty list of features.")
        label_key = "labels" if "labels" in features[0] else "label" if "label" in features[0] else None
        token_keys = [k for k in features[0] if k != label_key]
        num_choices = len(features[0]["input_ids"])
        flat = [{k: f[k][c] for k in token_keys} for f in features for c in range(num_choices)]
        batch = self.tokenizer.pad(
            flat, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"
        )
        out = {k: v.view(len(features), num_choices, -1) for k, v in batch.items()}
        if label_key is not None:
            out["labels"] = torch.tensor([int(f[label_key]) for f in features], dtype=torch.long)
        return out


def collator_for(
    task: str | TaskSpec, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A batch collator for :func:`encode`'s output: dynamic padding to the longest sequence."""
    spec = resolve_task(task)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"Tokenizer {type(tokenizer).__name__} has no pad token, so batches cannot be "
            "padded; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token."
        )
    if spec.is_multiple_choice:
        return MultipleChoiceCollator(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
