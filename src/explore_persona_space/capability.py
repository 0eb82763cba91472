"""Capability: multiple-choice accuracy by answer log-probability (ARC-Challenge at full scale).

Each choice is scored as the model's whole reply to the question in its own chat
format: ``log P(choice text + end-of-turn | chat prompt)``, summed over the reply's
tokens; the prediction is the argmax. The question is shown alone, without the
list of options (as in the usual log-likelihood ARC setup), so each choice is scored
independently of the others and of their order. The end-of-turn token is part of
the reply so that a choice that is a prefix of another ("water" / "water vapor") is
scored as a complete answer, not as the start of a longer one.

Order invariance is exact, not just up to rounding: an item's choices run as one
batch in the order of their texts, never in the order the item lists them, so a
permuted item runs through the very same computation. Ties go to the
alphabetically first choice text, for the same reason.

Sources: the ``arc_challenge`` alias (``allenai/ai2_arc``, config ARC-Challenge,
split test, 1,172 items; the commit read is resolved and recorded) or a local
json/jsonl file in the same schema - ``{"id", "question", "choices": {"text": [...],
"label": [...]}, "answerKey"}`` - such as the shipped :data:`MC_FIXTURE`. Both go
through the same ``datasets`` call. A bad row is an error naming the source, row
and field.

:func:`capability_stage` is the pipeline stage: it scores the chain's current
model (merged base + unmerged adapter), writes every item's choice scores to
``capability_items.json`` and adds ``capability`` (accuracy with Wilson and Wald
95% intervals) to the upstream result it carries forward.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explore_persona_space.models import end_of_turn, render_prompt
from explore_persona_space.personas import persona_prompt
from explore_persona_space.pipeline import Stage, StageContext
from explore_persona_space.results import atomic_write_json
from explore_persona_space.sft_data import hub_dataset_sha, local_path
from explore_persona_space.stages import model_state, resolve
from explore_persona_space.stats import wald_ci, wilson_ci

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ARC_CHALLENGE = "arc_challenge"
# alias -> (hub id, config, split)
MC_SOURCES: dict[str, tuple[str, str, str]] = {ARC_CHALLENGE: ("allenai/ai2_arc", "ARC-Challenge", "test")}
MC_FIXTURE = "data/fixtures/multiple_choice.jsonl"  # 20 items written for this project, ARC's schema
ITEMS_FILE = "capability_items.json"
# What the score is; part of the stage key, so a change of method never reuses old scores.
METHOD = "chat_reply_sum_logprob_with_eot"


class MCFormatError(ValueError):
    """A multiple-choice row that cannot be scored; the message names source, row and field."""


@dataclass(frozen=True)
class MCItem:
    id: str
    question: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    answer: str  # the correct choice's label

    @property
    def answer_text(self) -> str:
        return self.choices[self.labels.index(self.answer)]


def parse_item(row: Mapping[str, Any], where: str) -> MCItem:
    """One row of the ARC schema as an MCItem, or an MCFormatError naming ``where`` and the field."""
    question, choices, answer = row.get("question"), row.get("choices"), row.get("answerKey")
    if not isinstance(question, str) or not question.strip():
        raise MCFormatError(f"{where}: question: expected a non-empty string")
    if not isinstance(choices, Mapping) or not {"text", "label"} <= set(choices):
        raise MCFormatError(f"{where}: choices: expected an object with 'text' and 'label' lists")
    texts, labels = list(choices["text"] or []), list(choices["label"] or [])
    if len(texts) < 2 or len(texts) != len(labels):
        raise MCFormatError(
            f"{where}: choices: need >= 2 texts and one label each, got {texts!r} / {labels!r}"
        )
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise MCFormatError(f"{where}: choices.text: every choice must be a non-empty string")
    if len(set(labels)) != len(labels):
        raise MCFormatError(f"{where}: choices.label: duplicate labels {labels!r}")
    if answer not in labels:
        raise MCFormatError(f"{where}: answerKey: {answer!r} is not one of the labels {labels!r}")
    item_id = row.get("id")
    return MCItem(
        id=str(item_id) if item_id is not None else where,
        question=question.strip(),
        choices=tuple(t.strip() for t in texts),
        labels=tuple(str(lb) for lb in labels),
        answer=str(answer),
    )


def read_mc_source(
    source: str, n: int | None = None, *, revision: str | None = None
) -> tuple[list[MCItem], dict[str, Any]]:
    """The first ``n`` items (all if None) of an alias or local file, and what a stage records about them."""
    from datasets import load_dataset

    if n is not None and (isinstance(n, bool) or n < 1):
        raise ValueError(f"{source}: n must be a positive integer or None, got {n!r}")
    if source in MC_SOURCES:
        hub_id, config, split = MC_SOURCES[source]
        sha = hub_dataset_sha(hub_id, revision)
        rows = load_dataset(hub_id, config, split=split, revision=sha, streaming=True)
        record: dict[str, Any] = {"source": source, "hub_id": hub_id, "config": config, "split": split}
        record["revision"] = sha
        label = f"{source} ({hub_id} {config}, split {split})"
    else:
        local = local_path(source)
        if local is None or local.suffix not in (".json", ".jsonl"):
            valid = ", ".join(MC_SOURCES)
            raise ValueError(f"{source!r}: expected a local .json/.jsonl file or an alias ({valid})")
        if revision is not None:
            raise ValueError(f"{source}: 'revision' applies to hub datasets, not to a local file")
        rows = load_dataset("json", data_files={"test": str(local)}, split="test", streaming=True)
        record, label = {"source": source, "revision": None}, str(local)
    items: list[MCItem] = []
    for i, row in enumerate(rows):
        items.append(parse_item(row, f"{label} row {i}"))
        if n is not None and len(items) >= n:
            break
    if n is not None and len(items) < n:
        log.warning("%s: %d items asked for, the source has only %d", label, n, len(items))
    record["items"] = len(items)
    return items, record


# ----------------------------------------------------------------------------- scoring
def _item_ids(
    tokenizer: PreTrainedTokenizerBase, item: MCItem, system: str | None, eot: int
) -> tuple[list[int], dict[str, list[int]]]:
    """The chat prompt's ids, and each distinct choice's reply ids (choice text + end-of-turn)."""
    prompt = tokenizer(render_prompt(tokenizer, system, item.question), add_special_tokens=False)
    replies = {
        c: [*tokenizer(c, add_special_tokens=False)["input_ids"], eot] for c in sorted(set(item.choices))
    }
    return list(prompt["input_ids"]), replies


def choice_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[MCItem],
    *,
    system: str | None = None,
    progress: bool = True,
) -> list[dict[str, tuple[float, int]]]:
    """Per item, ``{choice text: (summed log-prob of the reply, its token count)}``.

    The prompt runs once per item; its key/value cache is repeated for the item's
    choices, which run together as one right-padded batch (a choice's tokens never
    see another choice's, nor the padding after them). Choices run in text order,
    so the computation does not depend on their order in the item.
    """
    import torch
    from tqdm.auto import tqdm

    eot = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.inference_mode():
        for item in tqdm(items, desc="capability", unit="item", disable=not progress):
            prompt, replies = _item_ids(tokenizer, item, system, eot)
            first = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
            cache = first.past_key_values
            cache.batch_repeat_interleave(len(replies))
            width = max(len(r) for r in replies.values())
            ids = torch.full((len(replies), width), pad, dtype=torch.long)
            mask = torch.zeros((len(replies), len(prompt) + width), dtype=torch.long)
            mask[:, : len(prompt)] = 1
            for row, reply in enumerate(replies.values()):
                ids[row, : len(reply)] = torch.tensor(reply)
                mask[row, len(prompt) : len(prompt) + len(reply)] = 1
            positions = torch.arange(len(prompt), len(prompt) + width).expand(len(replies), -1)
            rest = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                past_key_values=cache,
            ).logits
            start = first.logits[0, -1].float().log_softmax(-1)  # predicts each reply's first token
            scores = {}
            for row, (choice, reply) in enumerate(replies.items()):
                later = rest[row, : len(reply) - 1].float().log_softmax(-1)
                target = torch.tensor(reply[1:], device=later.device)
                total = start[reply[0]] + later.gather(-1, target[:, None]).sum()
                scores[choice] = (float(total), len(reply))
            out.append(scores)
    return out


def _argmax(scores: Mapping[str, float]) -> str:
    return min(scores, key=lambda text: (-scores[text], text))  # ties: the first text alphabetically


def score_items(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[MCItem],
    *,
    system: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per item: every choice's log-prob, the argmax, and whether it is the answer.

    ``predicted_norm`` is the argmax of the per-token mean log-prob (a length-normalised
    variant kept for reference; the accuracy reported is the summed log-prob's).
    """
    per_item = choice_logprobs(model, tokenizer, items, system=system, progress=progress)
    rows = []
    for item, scores in zip(items, per_item, strict=True):
        predicted = _argmax({c: s for c, (s, _) in scores.items()})
        predicted_norm = _argmax({c: s / n for c, (s, n) in scores.items()})
        rows.append(
            {
                "id": item.id,
                "answer": item.answer_text,
                "choices": {
                    lb: {"text": c, "logprob": scores[c][0], "tokens": scores[c][1]}
                    for lb, c in zip(item.labels, item.choices, strict=True)
                },
                "predicted": predicted,
                "correct": predicted == item.answer_text,
                "predicted_norm": predicted_norm,
                "correct_norm": predicted_norm == item.answer_text,
            }
        )
    return rows


def accuracy_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy with 95% Wilson and Wald intervals (None when there are no items)."""
    k, n = sum(bool(r["correct"]) for r in rows), len(rows)
    k_norm = sum(bool(r.get("correct_norm")) for r in rows)
    return {
        "k": k,
        "n": n,
        "accuracy": k / n if n else None,
        "wilson": list(wilson_ci(k, n)) if n else None,
        "wald": list(wald_ci(k, n)) if n else None,
        "accuracy_per_token": k_norm / n if n else None,
    }


# ----------------------------------------------------------------------------- the pipeline stage
@contextlib.contextmanager
def loaded_model(
    base: str, adapter: str | None, device: str | None
) -> Iterator[tuple[PreTrainedModel, PreTrainedTokenizerBase]]:
    """The base model with the adapter attached unmerged; the resident base gets its modules back after."""
    from explore_persona_space.models import (
        keep_resident,
        load_model,
        load_tokenizer,
        pick_device,
        resident_model,
    )

    device = pick_device(device)
    tokenizer = load_tokenizer(base)
    if not keep_resident(device):
        if adapter is None:
            yield load_model(base, device=device), tokenizer
            return
        from explore_persona_space.train import load_with_adapter

        yield load_with_adapter(base, Path(adapter), device=device), tokenizer
        return
    model = resident_model(base, device=device)
    if adapter is None:
        yield model, tokenizer
        return
    from peft import PeftModel

    attached = PeftModel.from_pretrained(model, adapter)
    try:
        yield attached, tokenizer
    finally:
        attached.unload()


def capability_stage(
    name: str,
    *,
    source: str,
    parent: Stage | None = None,
    base: str | None = None,
    n: int | None = None,
    persona: str | None = "assistant",
    revision: str | None = None,
    device: str | None = None,
) -> Stage:
    """Multiple-choice accuracy of the chain's current model; the upstream result gains ``capability``.

    ``persona`` names the system prompt the questions are asked under (None: no system
    message, the template's default).
    """

    def run(ctx: StageContext) -> dict[str, Any]:
        state = model_state(ctx)
        items, record = read_mc_source(source, n, revision=revision)
        system = persona_prompt(persona) if persona is not None else None
        with loaded_model(resolve(ctx, state["base"]), resolve(ctx, state["adapter"]), device) as (m, tok):
            rows = score_items(m, tok, items, system=system)
        atomic_write_json(ctx.dir / ITEMS_FILE, rows)
        summary = {"data": record, "persona": persona, "method": METHOD, **accuracy_summary(rows)}
        log.info("%s: accuracy %d/%d", name, summary["k"], summary["n"])
        upstream = dict(ctx.parent.result) if ctx.parent is not None else {"model": state}
        return {**upstream, "capability": summary}

    config: dict[str, Any] = {"source": source, "n": n, "persona": persona, "method": METHOD}
    if base is not None:
        config["base"] = base
    if revision is not None:
        config["revision"] = revision
    size = "all items" if n is None else f"{n} items"
    estimate = f"{source}: {size}, log-prob"
    return Stage(name, run, config, parent=parent, estimate=estimate, device=device, uses_model=True)
