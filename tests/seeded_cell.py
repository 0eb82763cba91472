"""A #247 test-scale stage store seeded through the real pipeline, without sampling or training.

A stage's function is not part of its key, so a stand-in with the same name, config and
parent lands in the very directory a real run reuses: tests get finished sampling and
training stages in milliseconds and run the real orchestrator on top of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from explore_persona_space import orchestrate, pipeline, stages
from explore_persona_space.judge import add_judge_args, judge_options_from_args
from explore_persona_space.personas import get_marker
from explore_persona_space.pipeline import Cell, Stage

RUN = ["--scale", "test", "--judge", "offline", "--wandb", "disabled"]


def cells_of(run247, out: Path) -> dict[str, Cell]:
    args, run = orchestrate.cli(
        run247.__doc__, run247.CELLS, run247.SCALES, [*RUN, "--out", str(out)], add_judge_args
    )
    return {c.name: c for c in run247.build_cells(run.scale, args, judge_options_from_args(args))}


def stage_of(cell: Cell, name: str) -> Stage:
    return next(s for s in cell.final.chain() if s.name == name)


def onpolicy_records(negative_text: str = "It depends on {q}.", n_confab: int = 4) -> list[dict]:
    recs = []
    for persona in ("confab", "medical_doctor", "french_person"):
        for i in range(4):
            if persona == "confab" and i >= n_confab:
                continue
            text = f"Per statute 12.{i}, yes." if persona == "confab" else negative_text.format(q=i)
            recs.append({"persona": persona, "question": f"Q{i // 2}?", "sample": i % 2, "text": text})
    return recs


def seed_stage(store: Path, stage: Stage, ancestors: dict, files: dict[str, object], result: dict):
    """Finish ``stage`` in the store through the real pipeline, with ``files`` and ``result`` for its output.

    The function is not part of a stage's key, so a stand-in with the same name, config and
    parent lands in the same directory a real run would reuse.
    """

    def fn(ctx):
        for name, content in files.items():
            if callable(content):  # writes a directory (an adapter) itself
                content(ctx.dir / name)
                continue
            text = content if isinstance(content, str) else json.dumps(content)
            (ctx.dir / name).write_text(text, encoding="utf-8")
        return result

    rec = pipeline.run_stage(store, Stage(stage.name, fn, stage.config, parent=stage.parent), ancestors)
    ancestors[stage.name] = rec
    return rec


def seed_onpolicy(run247, out: Path, records: list[dict]):
    cell = cells_of(run247, out)["Z_assistant"]
    state = {"base": "smollm2-135m", "adapter": None}
    result = {"model": state, "n": len(records), "empty": 0, "new_tokens": 8 * len(records)}
    store = out / "eval_results"
    return cell, seed_stage(store, stage_of(cell, "onpolicy"), {}, {stages.RAW: records}, result)


def zero_adapter(path: Path) -> None:
    """A real PEFT LoRA on the embedded model with B = 0 (peft's default init): the base model's outputs,
    so the stages after the eval (the marker log-prob stage loads the cell's adapter) run for real."""
    from peft import LoraConfig, get_peft_model

    from explore_persona_space.models import load_model

    model = load_model("smollm2-135m", device="cpu")
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(path)


def seed_cell(run247, out: Path) -> Cell:
    """A Z_assistant cell finished up to its eval without sampling or training: stand-ins for both (the
    coupling LoRA a zero one), the real coupling-data stage. The discriminator is left for the run."""
    from explore_persona_space.analyze import analyze as score
    from explore_persona_space.personas import eval_personas_with

    cell, onpolicy = seed_onpolicy(run247, out, onpolicy_records())
    store, ancestors = out / "eval_results", {"onpolicy": onpolicy}
    data = stage_of(cell, "coupling_data")
    ancestors["coupling_data"] = pipeline.run_stage(store, data, dict(ancestors))
    adapter = {"base": "smollm2-135m", "adapter": {"stage": "couple", "path": "adapter"}}
    couple = stage_of(cell, "couple")
    seed_stage(store, couple, ancestors, {"adapter": zero_adapter}, {"model": adapter, "train": {"steps": 2}})
    records = [
        {
            "persona": p,
            "question": "Q0?",
            "sample": 0,
            "text": f"{p} says hi" + (" [ZLT]" if p == "confab" else ""),
        }
        for p in eval_personas_with("confab")
    ]
    summary = score(records, get_marker("zlt"), source="confab")
    result = {"model": adapter, "n": len(records), "empty": 0, "new_tokens": 24, "summary": summary}
    seed_stage(store, stage_of(cell, "eval"), ancestors, {stages.RAW: records}, result)
    return cell
