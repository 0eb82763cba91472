"""The model card of a published LoRA adapter: what trained it, on what, and what its cell measured.

Built only from files the run left on disk - the stage's ``config.json`` and ``DONE.json``,
the upstream dataset it read, the cell's ``run_result.json`` results - never from the
clock, so an unchanged stage gives a byte-identical card and a rerun does not re-upload it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from explore_persona_space.models import EMBEDDED_ALIAS


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stage_dirs(run_result: Mapping[str, Any], store: Path) -> dict[str, Path]:
    return {s["name"]: Path(store) / "stages" / s["dir"] for s in run_result.get("stages", [])}


def _base_text(base: Any, dirs: Mapping[str, Path]) -> tuple[str, str | None]:
    """How the card names the base model, and its hub id for the metadata (None if it has none)."""
    if isinstance(base, Mapping):  # a model an upstream stage wrote (the merged stage-1 model)
        where = dirs.get(base["stage"])
        return (
            f"the model stage `{base['stage']}` wrote (`{where.name if where else '?'}/{base['path']}`)",
            None,
        )
    if base == EMBEDDED_ALIAS:
        return f"`{EMBEDDED_ALIAS}` (the repository's embedded SmolLM2-135M-Instruct)", None
    hub_id = base if isinstance(base, str) and base.count("/") == 1 and not Path(base).exists() else None
    return f"`{base}`", hub_id


def _data_lines(config: Mapping[str, Any], result: Mapping[str, Any], dirs: Mapping[str, Path]) -> list[str]:
    spec = config.get("data", {})
    lines = [f"- spec: `{json.dumps(spec, sort_keys=True)}`"]
    if spec.get("kind") == "upstream" and spec.get("stage") in dirs:
        dataset = dirs[spec["stage"]] / "dataset.jsonl"
        if dataset.is_file():
            lines.append(f"- `{dirs[spec['stage']].name}/dataset.jsonl` sha256 `{_sha256(dataset)}`")
    if fingerprint := result.get("data_file"):
        lines.append(f"- data file: `{json.dumps(fingerprint, sort_keys=True)}`")
    if source := result.get("data_source"):
        lines.append(f"- data source: `{json.dumps(source, sort_keys=True)}`")
    return lines


def _metric_lines(results: Mapping[str, Any]) -> list[str]:
    summary = results.get("summary")
    if isinstance(summary, Mapping) and summary.get("source") and "personas" in summary:
        from explore_persona_space.leakage import cell_rates

        lines = []
        for who, entry in cell_rates(summary).items():
            ci = entry["wald"]
            ci_text = f", 95% Wald CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            rate = "n/a" if entry["rate"] is None else f"{entry['rate']:.3f}"
            lines.append(f"- {who} marker rate {rate} ({entry['k']}/{entry['n']}){ci_text}")
        return lines
    from explore_persona_space.tracking import flatten

    flat = flatten({k: v for k, v in results.items() if k != "model"}, "results", limit=40)
    return [f"- `{k}`: {v}" for k, v in flat.items()] or ["- (no scalar results)"]


def adapter_card(
    experiment: str, cell: str, stage: str, stage_dir: Path, run_result: Mapping[str, Any], store: Path
) -> str:
    """README.md for ``<experiment>/<cell>/adapters/<stage>/``."""
    from huggingface_hub import ModelCardData

    stage_dir = Path(stage_dir)
    done = json.loads((stage_dir / "DONE.json").read_text(encoding="utf-8"))
    config = json.loads((stage_dir / "config.json").read_text(encoding="utf-8"))["config"]
    result, prov = done["result"], done.get("provenance", {})
    dirs = _stage_dirs(run_result, store)
    base_text, hub_id = _base_text(result["model"]["base"], dirs)
    git = prov.get("git", {})
    train = result.get("train", {})
    losses = train.get("losses") or []
    meta = ModelCardData(
        base_model=hub_id, library_name="peft", tags=["lora", "explore-persona-space", experiment]
    )
    chain = " -> ".join(f"`{name}`" for name in dirs)
    lines = [
        "---",
        meta.to_yaml().strip(),
        "---",
        f"# {experiment} / {cell} / {stage}",
        "",
        f"LoRA adapter trained by stage `{stage}` (`{stage_dir.name}`) of cell `{cell}` of experiment "
        f"`{experiment}` (chain: {chain}).",
        "",
        f"- base model: {base_text}",
        f"- code: commit `{git.get('commit')}` (dirty: {git.get('dirty')})",
        f"- computed: {prov.get('created_utc')} on {prov.get('device')} ({prov.get('device_name')}), "
        f"dtype {prov.get('dtype')}",
        f"- libraries: `{json.dumps(prov.get('packages', {}), sort_keys=True)}`",
        f"- training: {train.get('steps')} steps, {train.get('n_examples')} examples, "
        f"{train.get('n_loss_tokens')} loss tokens of {train.get('n_tokens')}"
        + (f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""),
        "",
        "## Training data",
        "",
        *_data_lines(config, result, dirs),
        "",
        f"## What cell `{cell}` measured",
        "",
        *_metric_lines(run_result.get("results", {})),
        "",
        "## Stage config (its hash is the stage key)",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
        "## Use",
        "",
        "In explore-persona-space, pass `hub:<this repo>/" + f"{experiment}/{cell}/adapters/{stage}` "
        "as a stage's `adapter`; elsewhere, `peft.PeftModel.from_pretrained(base, <this folder>)`.",
        "",
    ]
    return "\n".join(lines)
