"""Stages and cells of the two-marker study: dataset, two-marker eval (+ probe), the cell list.

Both #261 and its #354 re-run build their cells here from their own
:class:`~explore_persona_space.experiments.two_marker.scoring.Design` and
``Scale``. Per adapter cell the chain is::

    onpolicy (base model, shared by every cell) -> dataset -> train -> eval [+ probe on T cells]

plus one ``base_floor`` cell: the untrained base model scored for A and B.

The on-policy data and the base floor are the same stages for both designs (the
stage store is shared by every experiment), so whichever script runs second
reuses them, and #354 can read #261's finished evaluations for its design
comparison.

Every seed of a cell is the scale's one ``seed``: the on-policy, eval, probe and
floor sampling, the dataset draw and placement, the LoRA init and batch order,
and the bootstrap.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explore_persona_space.data import build_two_marker_dataset
from explore_persona_space.experiments.two_marker.scoring import (
    FLOOR_CELL,
    Design,
    Gates,
    Pair,
    probe_metrics,
    score_records,
)
from explore_persona_space.generate import Prompt, SamplingConfig, generate, persona_prompts
from explore_persona_space.generate_vllm import VLLMOptions, stage_key_fields
from explore_persona_space.metrics import LOOSE_DEFINITION, Mode
from explore_persona_space.personas import EVAL_PERSONAS, get_marker, persona_prompt, questions
from explore_persona_space.pipeline import DONE, Cell, Stage, StageContext, is_done, stage_dir
from explore_persona_space.results import write_raw_completions
from explore_persona_space.stages import (
    DATASET,
    RAW,
    generate_stage,
    model_state,
    nonempty_parent_completions,
    resolve,
    train_stage,
    write_dataset,
)
from explore_persona_space.train import TrainConfig

PROBE_RAW = "probe_completions.json"


def two_marker_data_stage(
    name: str,
    *,
    parent: Stage,
    pair: Pair,
    negatives: tuple[str, ...],
    condition: str,
    placement: str,
    n_per_persona: int,
    seed: int,
) -> Stage:
    """The #261 dataset of one (pair, condition) from the parent's on-policy completions."""

    def run(ctx: StageContext) -> dict[str, Any]:
        records, kept = nonempty_parent_completions(ctx)
        examples = build_two_marker_dataset(
            kept,
            donor=pair.donor,
            recipient=pair.recipient,
            negatives=negatives,
            condition=condition,  # type: ignore[arg-type]
            marker_a=get_marker("a"),
            marker_b=get_marker("b"),
            n_per_persona=n_per_persona,
            seed=seed,
            design=placement,  # type: ignore[arg-type]
        )
        write_dataset(ctx.dir / DATASET, examples)
        return {
            "model": model_state(ctx),
            "n": len(examples),
            "roles": dict(Counter(ex.role for ex in examples)),
            "dropped_empty": len(records) - len(kept),
        }

    config = {
        "donor": pair.donor,
        "recipient": pair.recipient,
        "negatives": list(negatives),
        "condition": condition,
        "placement": placement,
        "markers": ["a", "b"],
        "n_per_persona": n_per_persona,
        "seed": seed,
    }
    n = n_per_persona * (2 + len(negatives))
    return Stage(name, run, config, parent=parent, estimate=f"{n:,} examples ({condition}, {placement})")


def two_marker_eval_stage(
    name: str,
    roles: Mapping[str, str],
    sampling: SamplingConfig,
    *,
    mode: Mode,
    id_questions: int,
    ood_questions: int,
    n_boot: int,
    seed: int,
    probe: Mapping[str, Any] | None = None,
    parent: Stage | None = None,
    base: str | None = None,
    backend: str = "auto",
    device: str | None = None,
    vllm: VLLMOptions | None = None,
) -> Stage:
    """Sample every persona x (ID + OOD questions) and score A, B, P(B|A) and positions.

    ``probe`` (``{"persona", "questions", "sampling"}``) adds the weird-marker
    probe: that persona answers the first ``questions`` ID questions with the
    probe marker prepended to the user turn.
    """
    id_qs = list(questions("generic"))[:id_questions]
    ood_qs = list(questions("ood"))[:ood_questions]
    split = {q: "id" for q in id_qs} | {q: "ood" for q in ood_qs}
    probe_sampling = SamplingConfig(**probe["sampling"]) if probe else None

    def probe_prompts(spec: Mapping[str, Any]) -> list[Prompt]:
        persona, marker = spec["persona"], get_marker("probe")
        return [Prompt(persona, f"{marker} {q}", persona_prompt(persona)) for q in id_qs[: spec["questions"]]]

    def run(ctx: StageContext) -> dict[str, Any]:
        state = model_state(ctx)
        model, adapter = resolve(ctx, state["base"]), resolve(ctx, state["adapter"])
        adapter_path = Path(adapter) if adapter else None
        kw = {"adapter": adapter_path, "backend": backend, "device": device, "vllm": vllm}
        main = persona_prompts(list(roles), id_qs + ood_qs)
        probed: list[dict[str, Any]] = []
        if probe and probe_sampling == sampling:  # one pass: one model load (one vLLM engine) for both
            both = generate(model, main + probe_prompts(probe), sampling, **kw)
            records, probed = both[: len(main) * sampling.n_samples], both[len(main) * sampling.n_samples :]
        else:
            records = generate(model, main, sampling, **kw)
            if probe:
                probed = generate(model, probe_prompts(probe), probe_sampling, **kw)
        for rec in records:
            rec["split"] = split[rec["question"]]
        write_raw_completions(ctx.dir / RAW, records)
        out: dict[str, Any] = {
            "model": state,
            "n": len(records),
            "new_tokens": sum(r["completion_tokens"] for r in records),
            "metrics": score_records(records, roles, mode=mode, n_boot=n_boot, seed=seed),
        }
        if probe:
            write_raw_completions(ctx.dir / PROBE_RAW, probed)
            tokens = sum(r["completion_tokens"] for r in probed)
            out["probe"] = {"persona": probe["persona"], "new_tokens": tokens, **probe_metrics(probed, mode)}
        return out

    config = {
        **({"base": base} if base is not None else {}),
        "roles": dict(roles),
        # loose was keyed by its absence before the mode was a field; its definition keys it now
        **({"mode": mode} if mode != "loose" else {"loose_definition": LOOSE_DEFINITION}),
        "banks": {"generic": len(id_qs), "ood": len(ood_qs)},
        "sampling": dataclasses.asdict(sampling),
        "n_boot": n_boot,
        "seed": seed,
        "probe": dict(probe or {}),
        **stage_key_fields(vllm, backend),
    }
    n = len(roles) * len(split) * sampling.n_samples
    extra = f" + probe {probe['questions'] * probe['sampling']['n_samples']}" if probe else ""
    return Stage(
        name,
        run,
        config,
        parent=parent,
        estimate=f"{n:,}{extra} generations x <= {sampling.max_new_tokens} tokens",
        device=device,
        uses_model=True,
    )


@dataclass(frozen=True)
class Scale:
    """The sizes and recipe of one two-marker run; the scripts give every field a value."""

    model: str
    seed: int  # every sampling, data, LoRA and bootstrap seed (see the docstring)
    onpolicy: SamplingConfig  # base-model completions per persona x data question
    onpolicy_questions: int
    onpolicy_every_persona: bool  # False: only the 8 trained personas (the others' data is never used)
    n_per_persona: int  # donor, recipient and each negative contribute this many examples
    train: TrainConfig
    eval: SamplingConfig
    id_questions: int  # from the "generic" bank
    ood_questions: int  # from the "ood" bank
    probe: SamplingConfig
    probe_questions: int  # recipient only, probe marker prepended to the user turn
    floor: SamplingConfig
    floor_questions: int  # base model, every eval persona
    n_boot: int
    gates: Gates


def build_cells(
    design: Design,
    scale: Scale,
    *,
    backend: str = "auto",
    device: str | None = None,
    vllm: VLLMOptions | None = None,
) -> list[Cell]:
    """The base-floor cell and the six adapters (2 pairs x 3 conditions) of one design."""
    seed = scale.seed

    def seeded(sampling: SamplingConfig) -> SamplingConfig:
        return dataclasses.replace(sampling, seed=seed)

    gen = {"backend": backend, "device": device, "vllm": vllm}
    personas = EVAL_PERSONAS if scale.onpolicy_every_persona else design.trained_personas()
    onpolicy = generate_stage(
        "onpolicy",
        personas,
        "data",
        seeded(scale.onpolicy),
        base=scale.model,
        retry_empty=3,
        n_questions=scale.onpolicy_questions,
        **gen,
    )
    evaluation = {"mode": design.match_mode, "n_boot": scale.n_boot, "seed": seed, **gen}
    floor = two_marker_eval_stage(
        "floor",
        dict.fromkeys(EVAL_PERSONAS, "base"),
        seeded(scale.floor),
        id_questions=scale.floor_questions,
        ood_questions=0,
        base=scale.model,
        **evaluation,
    )
    cells = [Cell(FLOOR_CELL, floor, publish=(RAW,), seeds={"eval": seed}, role="floor")]
    recipe = dataclasses.replace(scale.train, seed=seed)
    for name, pair, condition in design.adapter_cells():
        data = two_marker_data_stage(
            "dataset",
            parent=onpolicy,
            pair=pair,
            negatives=design.negatives,
            condition=condition,
            placement=design.placement,
            n_per_persona=scale.n_per_persona,
            seed=seed,
        )
        train = train_stage(
            "train", recipe, {"kind": "upstream", "stage": "dataset"}, parent=data, device=device
        )
        probe = None
        if condition == "T":  # the write-up probed the chunk-on-donor adapter's recipient
            sampling = dataclasses.asdict(seeded(scale.probe))
            probe = {"persona": pair.recipient, "questions": scale.probe_questions, "sampling": sampling}
        final = two_marker_eval_stage(
            "eval",
            design.roles(pair),
            seeded(scale.eval),
            id_questions=scale.id_questions,
            ood_questions=scale.ood_questions,
            probe=probe,
            parent=train,
            **evaluation,
        )
        seeds = {"data": seed, "onpolicy": seed, "train": seed, "eval": seed, "bootstrap": seed}
        publish = (RAW, PROBE_RAW) if probe else (RAW,)
        cells.append(Cell(name, final, publish=publish, seeds=seeds, role=condition))  # wandb job_type
    return cells


def finished_results(root: Path, cells: list[Cell]) -> dict[str, dict[str, Any]]:
    """Final-stage results of every cell already finished in ``root`` (this run or an earlier one)."""
    out = {}
    for cell in cells:
        if is_done(root, cell.final):
            done = json.loads((stage_dir(root, cell.final) / DONE).read_text(encoding="utf-8"))
            out[cell.name] = done["result"]
    return out
