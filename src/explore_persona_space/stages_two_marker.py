"""Stages and cells of the two-marker experiments: dataset, two-marker eval (+ probe), the cell list.

Both #261 and its #354 re-run build their cells here from a
:class:`~explore_persona_space.within_marker.Design` and a
:class:`~explore_persona_space.within_marker.Scale`, so the two scripts differ
only in the design they name. Per adapter cell the chain is::

    onpolicy (base model, shared by every cell) -> dataset -> train -> eval [+ probe on T cells]

plus one ``base_floor`` cell: the untrained base model scored for A and B.

Both experiments keep their stages in one store (``eval_results/issue261/stages``):
the on-policy data and the base floor are the same stages for both designs, so
whichever script runs second reuses them, and #354 can read #261's finished
evaluations for its design comparison.
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
from explore_persona_space.generate import Prompt, SamplingConfig, generate, persona_prompts
from explore_persona_space.orchestrate import ExperimentPaths
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
)
from explore_persona_space.within_marker import (
    FLOOR_CELL,
    NEGATIVES,
    Design,
    Pair,
    Scale,
    adapter_cells,
    probe_metrics,
    score_records,
)

PROBE_RAW = "probe_completions.json"
STORE = "issue261"  # the stage store both designs share


@dataclass(frozen=True)
class WithinMarkerPaths(ExperimentPaths):
    """Outputs under the experiment's own name; stages in the shared two-marker store."""

    store: str = STORE

    @property
    def stages(self) -> Path:
        return self.out / "eval_results" / self.store


def two_marker_data_stage(
    name: str,
    *,
    parent: Stage,
    pair: Pair,
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
            negatives=NEGATIVES,
            condition=condition,  # type: ignore[arg-type]
            marker_a=get_marker("a"),
            marker_b=get_marker("b"),
            n_per_persona=n_per_persona,
            seed=seed,
            design=placement,  # type: ignore[arg-type]
        )
        lines = "".join(json.dumps(ex.to_record(), ensure_ascii=False) + "\n" for ex in examples)
        (ctx.dir / DATASET).write_text(lines, encoding="utf-8")
        return {
            "model": model_state(ctx),
            "n": len(examples),
            "roles": dict(Counter(ex.role for ex in examples)),
            "dropped_empty": len(records) - len(kept),
        }

    config = {
        "donor": pair.donor,
        "recipient": pair.recipient,
        "negatives": list(NEGATIVES),
        "condition": condition,
        "placement": placement,
        "markers": ["a", "b"],
        "n_per_persona": n_per_persona,
        "seed": seed,
    }
    n = n_per_persona * (2 + len(NEGATIVES))
    return Stage(name, run, config, parent=parent, estimate=f"{n:,} examples ({condition}, {placement})")


def two_marker_eval_stage(
    name: str,
    roles: Mapping[str, str],
    sampling: SamplingConfig,
    *,
    id_questions: int,
    ood_questions: int,
    n_boot: int,
    seed: int,
    probe: Mapping[str, Any] | None = None,
    parent: Stage | None = None,
    base: str | None = None,
    backend: str = "auto",
    device: str | None = None,
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
        kw = {"adapter": adapter_path, "backend": backend, "device": device}
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
            "metrics": score_records(records, roles, n_boot=n_boot, seed=seed),
        }
        if probe:
            write_raw_completions(ctx.dir / PROBE_RAW, probed)
            tokens = sum(r["completion_tokens"] for r in probed)
            out["probe"] = {"persona": probe["persona"], "new_tokens": tokens, **probe_metrics(probed)}
        return out

    config = {
        **({"base": base} if base is not None else {}),
        "roles": dict(roles),
        "banks": {"generic": len(id_qs), "ood": len(ood_qs)},
        "sampling": dataclasses.asdict(sampling),
        "n_boot": n_boot,
        "seed": seed,
        "probe": dict(probe or {}),
    }
    n = len(roles) * len(split) * sampling.n_samples
    extra = f" + probe {probe['questions'] * probe['sampling']['n_samples']}" if probe else ""
    return Stage(
        name,
        run,
        config,
        parent=parent,
        estimate=f"{n:,}{extra} generations x <= {sampling.max_new_tokens} tokens",
    )


def build_cells(
    design: Design, scale: Scale, model: str, *, backend: str = "auto", device: str | None = None
) -> list[Cell]:
    """The base-floor cell and the six adapters (2 pairs x 3 conditions) of one design."""
    gen = {"backend": backend, "device": device}
    onpolicy = generate_stage(
        "onpolicy",
        scale.onpolicy_personas,
        "data",
        scale.onpolicy,
        base=model,
        retry_empty=3,
        n_questions=scale.onpolicy_questions,
        **gen,
    )
    floor = two_marker_eval_stage(
        "floor",
        dict.fromkeys(EVAL_PERSONAS, "base"),
        scale.floor,
        id_questions=scale.floor_questions,
        ood_questions=0,
        n_boot=scale.n_boot,
        seed=scale.seed,
        base=model,
        **gen,
    )
    cells = [Cell(FLOOR_CELL, floor, publish=(RAW,), seeds={"eval": scale.floor.seed})]
    recipe = design.recipe(scale.train)
    for name, pair, condition in adapter_cells():
        data = two_marker_data_stage(
            "dataset",
            parent=onpolicy,
            pair=pair,
            condition=condition,
            placement=design.placement,
            n_per_persona=scale.n_per_persona,
            seed=scale.seed,
        )
        train = train_stage(
            "train", recipe, {"kind": "upstream", "stage": "dataset"}, parent=data, device=device
        )
        probe = None
        if condition == "T":  # the write-up probed the chunk-on-donor adapter's recipient
            sampling = dataclasses.asdict(scale.probe)
            probe = {"persona": pair.recipient, "questions": scale.probe_questions, "sampling": sampling}
        final = two_marker_eval_stage(
            "eval",
            pair.roles(),
            scale.eval,
            id_questions=scale.id_questions,
            ood_questions=scale.ood_questions,
            n_boot=scale.n_boot,
            seed=scale.seed,
            probe=probe,
            parent=train,
            **gen,
        )
        seeds = {
            "data": scale.seed,
            "onpolicy": scale.onpolicy.seed,
            "train": recipe.seed,
            "eval": scale.eval.seed,
        }
        cells.append(Cell(name, final, publish=(RAW, PROBE_RAW) if probe else (RAW,), seeds=seeds))
    return cells


def finished_results(root: Path, cells: list[Cell]) -> dict[str, dict[str, Any]]:
    """Final-stage results of every cell already finished in ``root`` (this run or an earlier one)."""
    out = {}
    for cell in cells:
        if is_done(root, cell.final):
            done = json.loads((stage_dir(root, cell.final) / DONE).read_text(encoding="utf-8"))
            out[cell.name] = done["result"]
    return out


# ----------------------------------------------------------------------------- the scripts' shared run
@dataclass(frozen=True)
class Invocation:
    """What both two-marker scripts resolve from their command line before running anything."""

    args: Any
    scale: Scale
    paths: WithinMarkerPaths
    all_cells: list[Cell]
    cells: list[Cell]  # the --cells selection


def invocation(design: Design, doc: str | None, argv: list[str] | None) -> Invocation:
    from explore_persona_space import orchestrate
    from explore_persona_space.within_marker import SCALES, cell_names

    p = orchestrate.parser(doc, cell_names(), scales=tuple(SCALES))
    args = p.parse_args(argv)
    scale = orchestrate.resolve_scale(p, args, SCALES)  # --set applies to the scale's top-level fields
    orchestrate.setup_logging()
    args.out = args.out.resolve()
    paths = WithinMarkerPaths(design.experiment, args.out)
    all_cells = build_cells(design, scale, args.model, backend=args.backend, device=args.device)
    return Invocation(args, scale, paths, all_cells, orchestrate.select(all_cells, args.cells))


def run_and_summarize(inv: Invocation, design: Design) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Run the selected cells (reusing finished stages); score every finished cell of the design."""
    from explore_persona_space import orchestrate
    from explore_persona_space.within_marker_report import summarize

    args = inv.args
    config = {
        "experiment": design.experiment,
        "scale": args.scale,
        "model": args.model,
        **inv.scale.to_dict(),
    }
    orchestrate.execute(inv.paths, inv.cells, config=config)
    results = finished_results(inv.paths.stages, inv.all_cells)
    summary = summarize(results, design=design, scale_name=args.scale, scale=inv.scale, model=args.model)
    return results, summary
