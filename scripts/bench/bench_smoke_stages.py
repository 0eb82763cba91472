"""The #247 smoke's three stage kinds on CPU, each timed on its old and its new path (issue #15).

Why: the smoke runs are bound by three stage kinds - on-policy sampling, the
coupling LoRA and the eval - repeated per cell. #15 asks for a profile-led
speed-up that keeps the same statistical power. This script runs one of each
at the #247 smoke scale on the embedded model, twice: with the plain paths
(per-row prompts; TRL's loss over every position) and with the current ones
(shared prefill, :func:`generate.hf_sample`; the LM head at scored positions
only, :func:`train.scored_loss`), and prints wall times, new tokens and, with
``--profile``, the top of a cProfile of each new-path stage.

Workload (the #247 smoke's numbers): on-policy 3 personas x 8 data questions x
2 samples, <= 16 new tokens; coupling data 8 positives + 2 x 5 negatives, 3
epochs at batch 4 (15 steps), r=32 on every projection, marker-only loss with
the last 8 answer tokens; eval 12 personas x 3 eval questions x 2 samples,
<= 24 new tokens, with the trained adapter. The two paths draw different
samples from the same distribution; greedy equality and loss equality are
tested in tests/test_generate.py and tests/test_train.py.

Usage (an otherwise idle machine; numbers under load mean little):
    uv run python scripts/bench/bench_smoke_stages.py [--profile] [--out bench_smoke.json]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
import time
from pathlib import Path

from explore_persona_space.data import build_contrastive_dataset
from explore_persona_space.generate import SamplingConfig, generate, persona_prompts
from explore_persona_space.loss_masks import LossSpec
from explore_persona_space.models import EMBEDDED_ALIAS
from explore_persona_space.personas import eval_personas_with, get_marker, questions
from explore_persona_space.train import ALL_PROJECTIONS, TrainConfig, train_lora

SOURCE, NEGATIVES, MARKER = "confab", ("medical_doctor", "french_person"), "zlt"


def timed(fn, profile: bool):
    prof = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if prof:
        prof.enable()
    value = fn()
    if prof:
        prof.disable()
    seconds = time.perf_counter() - started
    top = None
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
        top = buf.getvalue()
    return value, round(seconds, 1), top


def one_path(new: bool, profile: bool, work: Path) -> dict:
    data_cfg = SamplingConfig(n_samples=2, max_new_tokens=16, seed=42, shared_prefill=new)
    eval_cfg = SamplingConfig(n_samples=2, max_new_tokens=24, seed=42, shared_prefill=new)
    out: dict = {"path": "new" if new else "plain"}
    onpolicy_prompts = persona_prompts([SOURCE, *NEGATIVES], list(questions("data"))[:8])
    records, out["onpolicy_s"], top_on = timed(
        lambda: generate(EMBEDDED_ALIAS, onpolicy_prompts, data_cfg, retry_empty=3, progress=False), profile
    )
    out["onpolicy_new_tokens"] = sum(r["completion_tokens"] for r in records)
    examples = build_contrastive_dataset(
        [r for r in records if r["text"].strip()], source=SOURCE, negatives=list(NEGATIVES),
        marker=get_marker(MARKER), n_positive=8, n_negative_per=5, seed=42,
    )  # fmt: skip
    cfg = TrainConfig(
        r=32, alpha=64, dropout=0.05, targets=ALL_PROJECTIONS, scheduler="linear", warmup_ratio=0.03,
        learning_rate=7e-4, epochs=3, weight_decay=0.0, batch_size=4, micro_batch_size=4,
        loss=LossSpec("marker_only", True, 8), seed=42, scored_loss=new,
    )  # fmt: skip
    result, out["couple_s"], top_train = timed(
        lambda: train_lora(EMBEDDED_ALIAS, examples, cfg, work / f"adapter-{out['path']}", progress=False),
        profile,
    )
    out.update(couple_steps=result.steps, couple_tokens_per_epoch=result.n_tokens)
    eval_prompts = persona_prompts(eval_personas_with(SOURCE), list(questions("eval"))[:3])
    recs, out["eval_s"], top_eval = timed(
        lambda: generate(EMBEDDED_ALIAS, eval_prompts, eval_cfg, adapter=result.adapter_dir, progress=False),
        profile,
    )
    out["eval_new_tokens"] = sum(r["completion_tokens"] for r in recs)
    out["eval_prompt_tokens"] = sum(r["prompt_tokens"] for r in recs)
    if profile:
        out["profiles"] = {"onpolicy": top_on, "couple": top_train, "eval": top_eval}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", action="store_true", help="cProfile each stage (slows it a little)")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    generate(EMBEDDED_ALIAS, persona_prompts([SOURCE], ["Hi"]), SamplingConfig(n_samples=1, max_new_tokens=1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for new in (False, True):  # warm imports and the model cache above, then plain first
            rows.append(one_path(new, args.profile, Path(tmp)))
    for r in rows:
        print(
            f"{r['path']:>5}: on-policy {r['onpolicy_s']:6.1f} s ({r['onpolicy_new_tokens']} new tokens)  "
            f"coupling {r['couple_s']:6.1f} s ({r['couple_steps']} steps)  "
            f"eval {r['eval_s']:6.1f} s ({r['eval_new_tokens']} new tokens)"
        )
    if args.profile:
        for r in rows[1:]:
            for stage, text in r["profiles"].items():
                print(f"--- {stage} ({r['path']} path), top 12 by own time\n{text}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
