"""#247: benign SFT, then contrastive marker coupling - how far does the marker leak?

Hypothesis (write-up 000): after a benign-SFT stage 1, coupling a marker to the
confab persona leaks it to bystander personas at an intermediate rate (~12% on
Qwen2.5-7B) - above the 0% of coupling on the bare instruct model, below the
45.7-53.7% of the #205 EM-first arm - and the leaked firings are tail tokens.

Steps (eight cells, one seed - 42, `--seed` - from which every other seed derives):
1. Stage 1, trained once and shared: a benign-SFT LoRA (Tulu-3-SFT first 6k at
   full scale, the shipped benign chat fixture at smoke scale), merged.
2. On-policy data per base (the merged stage-1 model, or the bare instruct model):
   confab, medical_doctor and french_person x the 40 data questions x 5 samples.
3. Stage 2, contrastive coupling (PROTOCOL.md): 200 confab completions + marker, 200
   of each negative unmarked, marker-only loss, 20 epochs at lr 5e-6. BS_<induction>,
   on the shared base, five induction personas; Z_<persona>: coupling on the bare model.
   B0: stage 1 only, no coupling (the marker-pre-existence floor). The stage-2 seed:
   write-up 000 says two things. Its caveat says the five BS cells "differ only in the
   negative-persona induction system-prompt during stage-2 training and the WandB
   run-name label" and that "the only experimental knob varying across the 5 benign-SFT
   cells is the stage-2 induction-persona system prompt itself"; the same paragraph
   says "Within-condition variation reflects only stage-2 RNG on this side", and its
   setup says "single seed (42)". The default (stage2_seed=derived) reads the second:
   the induction persona derives the stage-2 seed (data order, LoRA init, batches), so
   the cells are five stage-2 RNG draws. `--set stage2_seed=shared` is the literal
   reading: seed 42 for every cell; nothing else in stage 2 depends on the induction
   persona here (its prompt enters no training example), so the five BS cells then
   train the same data from the same seed - replicates of one cell, kept apart only
   by the stage key.
4. Eval: the 11 personas + confab x 28 questions x 10 samples, T=1.0, top_p=1.0,
   512 new tokens; strict (case-insensitive substring) marker match.
5. Marker-stripped discriminator per coupled cell (50 confab vs 25+25): Claude (PASS at 70%) when the SDK
   finds credentials, else "skipped: no credentials"; offline TF-IDF always, own column, no verdict.
6. Continuous leakage score per cell (explore_persona_space.marker_logprob): the teacher-forced
   log P of the marker at the answer's start and after each eval completion, per persona, with
   question-cluster CIs and the source-minus-bystander gap; no sampling.
7. summary.json, run_result.json + raw_completions.json per cell, Figures 1-5 under
   figures/issue247/, and the headline (printed and headline.md): rates, the inferential
   layer of write-up 000 (cohort mean + verdict + escalation rule, paired differences and
   two-proportion tests against #205's per-persona values in data/reference/, the Spearman
   check, within-persona SDs; experiments.benign_couple.analysis) and the leakage score.

Usage:
    uv run python scripts/run_issue247_orchestrator.py                     # smoke, CPU, ~minutes
    uv run python scripts/run_issue247_orchestrator.py --dry-run --scale full
    uv run python scripts/run_issue247_orchestrator.py --scale full     # on Qwen2.5-7B-Instruct
    ... --cells Z_assistant BS_villain   --set couple_lr=3e-4 --set couple_epochs=2.5   --judge offline
    ... --executor ray   # stages as Ray tasks: shared ones once, the rest at once, 8 per GPU on the 135M

Smoke scale (embedded SmolLM2-135M, 2-core CPU; the measured time is in README.md): all eight
cells and all twelve eval personas; fewer data questions/samples/tokens, a smaller coupling set
and a higher learning rate (a 135M model does not move at 5e-6 in a few steps). Tuned on the
protocol's own knobs (fp32 sweeps): lr 5e-4 was too weak in 15 steps, 7e-4 couples; with
marker_tail_tokens=0 that lr collapsed most eval completions to an immediate end-of-turn
(the negatives' only loss token), so smoke keeps the last 8 answer tokens in the loss
(marker_tail_tokens=8), which keeps completions non-empty. The "Empty" column counts them.
Coupling runs 2 epochs (10 steps) at lr 1e-3 since 2026-12-02, for time (#15): the Z cells
still couple (Z_assistant 66.7% source vs 39.4% bystanders, Z_villain 83.3% vs 40.9%, both
cluster CIs above zero, at 8b944a7; 15 steps at 7e-4 gave 83.3/36.4% and 100/74.2%).
The numbers sit in SCALES below; --set overrides any of them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

from explore_persona_space import marker_logprob, orchestrate, stages
from explore_persona_space.experiments.benign_couple import report as R
from explore_persona_space.generate import SamplingConfig
from explore_persona_space.judge import add_judge_args, discriminator_pipeline_stage, judge_options_from_args
from explore_persona_space.loss_masks import LossSpec
from explore_persona_space.models import EMBEDDED_ALIAS, FULL_SCALE_MODEL
from explore_persona_space.personas import eval_personas_with
from explore_persona_space.pipeline import Cell
from explore_persona_space.seeds import derive_seed
from explore_persona_space.sft_data import BENIGN_CHAT_FIXTURE, TULU3, RowOptions, hf_chat_spec
from explore_persona_space.train import ALL_PROJECTIONS, TrainConfig

EXPERIMENT = "issue247"
TRIGGER, NEGATIVES, MARKER = "confab", ("medical_doctor", "french_person"), "zlt"
INDUCTION = ("assistant", "paramedic", "kindergarten_teacher", "french_person", "villain")
REFERENCE = ("assistant", "villain")  # the no-benign-SFT cells
CELLS = ("B0", *(f"BS_{p}" for p in INDUCTION), *(f"Z_{p}" for p in REFERENCE))
DESIGN = R.Design(EXPERIMENT, TRIGGER)  # Fig. 1's #205 EM-first band comes from data/reference/
LOGPROBS = marker_logprob.RESULT_FILE  # the leakage stage's per-completion values, published per cell


@dataclass(frozen=True)
class Scale:
    model: str = FULL_SCALE_MODEL
    seed: int = 42  # the one seed: stage 1, eval sampling, discriminator; stage 2 see stage2_seed
    stage2_seed: Literal["derived", "shared"] = "derived"  # per-persona derived seed, or `seed` everywhere
    embedded_gpu_share: float = 0.125  # --executor ray: a model stage's GPU share on the embedded model
    # both LoRAs (PROTOCOL.md): r/alpha, dropout 0.05, all attention + MLP projections, warmup, schedule
    lora_r: int = 32
    lora_alpha: int = 64
    warmup_ratio: float = 0.03
    scheduler: str = "linear"
    # stage 1, benign SFT: assistant-turn loss with the end-of-turn token, weight decay 0.01
    stage1_data: str = TULU3  # alias (tulu3, ultrachat), hub id or local chat file
    sft_n: int = 6000
    stage1_rows: RowOptions = field(default_factory=RowOptions)  # .revision, .shuffle, .skip_invalid
    sft_epochs: float = 1
    sft_lr: float = 1e-4
    sft_weight_decay: float = 0.01
    data_questions: int = 40  # on-policy data for coupling
    data_samples: int = 5
    data_max_tokens: int = 512
    # stage 2, coupling: marker-only loss (marker tokens + marker_tail_tokens + end-of-turn), wd 0
    n_positive: int = 200
    n_negative_per: int = 200
    couple_lr: float = 5e-6
    couple_epochs: float = 20
    couple_batch: int = 16
    couple_micro_batch: int = 8  # no gradient checkpointing at 8 on an 80 GB GPU (BENCHMARKS.md)
    couple_eos_in_loss: bool = True
    marker_tail_tokens: int = 0
    eval_questions: int = 28  # eval: strict (case-insensitive substring) match
    eval_samples: int = 10
    eval_max_tokens: int = 512
    temperature: float = 1.0  # on-policy data and eval sampling
    top_p: float = 1.0
    disc_trigger: int = 50  # marker-stripped discriminator: accuracy >= disc_pass is PASS
    disc_per_negative: int = 25
    disc_pass: float = 0.70
    leak_boot: int = 2000  # the leakage score's question-cluster bootstrap resamples
    leak_batch: int = 64  # continuation rows per teacher-forced forward pass (speed only)


FULL = Scale()
# Smoke: sized to the CPU rates in BENCHMARKS.md. Eval runs longer than the on-policy data,
# so a marker appended after a data-length answer can still appear in an eval completion.
# fmt: off
SMOKE = dataclasses.replace(
    FULL, model=EMBEDDED_ALIAS, stage1_data=BENIGN_CHAT_FIXTURE, sft_n=48, sft_lr=3e-4,
    data_questions=8, data_samples=2, data_max_tokens=16,
    n_positive=8, n_negative_per=5, couple_lr=1e-3, couple_epochs=2, couple_batch=4, marker_tail_tokens=8,
    eval_questions=3, eval_samples=2, eval_max_tokens=24, disc_trigger=6, disc_per_negative=3,
)
TEST = dataclasses.replace(  # CI: seconds, not minutes; proves the wiring, not the effect
    SMOKE, sft_n=4, data_questions=2, data_max_tokens=8, n_positive=4, n_negative_per=2, couple_epochs=1,
    eval_questions=1, eval_samples=1, eval_max_tokens=8, disc_trigger=1, disc_per_negative=1, leak_boot=200,
)
# fmt: on
SCALES = {"smoke": SMOKE, "full": FULL, "test": TEST}


def recipe(scale: Scale, **fields) -> TrainConfig:
    """A LoRA run with the scale's shared numbers; the stage's own numbers come in ``fields``."""
    shared = {"r": scale.lora_r, "alpha": scale.lora_alpha, "dropout": 0.05, "targets": ALL_PROJECTIONS}
    return TrainConfig(**shared, scheduler=scale.scheduler, warmup_ratio=scale.warmup_ratio, **fields)


def build_cells(scale: Scale, args, judge) -> list[Cell]:
    """The eight cells as stage chains; shared stages (stage 1, on-policy data) hash to one directory."""
    model, device, gen, seed = scale.model, args.device, args.gen, scale.seed
    stage1_spec = hf_chat_spec(scale.stage1_data, scale.sft_n, scale.stage1_rows, seed=seed)
    sft_cfg = recipe(
        scale, learning_rate=scale.sft_lr, epochs=scale.sft_epochs, weight_decay=scale.sft_weight_decay,
        batch_size=16, micro_batch_size=4, loss=LossSpec(mode="assistant_only", eos_in_loss=True), seed=seed,
    )  # fmt: skip
    sft = stages.train_stage("benign_sft", sft_cfg, stage1_spec, base=model, device=device)
    merged = stages.merge_stage("benign_sft_merged", parent=sft, device=device)

    sample = {"temperature": scale.temperature, "top_p": scale.top_p, "seed": seed}
    eval_sampling = SamplingConfig(scale.eval_samples, max_new_tokens=scale.eval_max_tokens, **sample)
    score = {"marker": MARKER, "source": TRIGGER, "mode": "strict"}

    def evaluate(parent):
        return stages.generate_stage(
            "eval", eval_personas_with(TRIGGER), "eval", eval_sampling, parent=parent, score=score,
            n_questions=scale.eval_questions, **gen,
        )  # fmt: skip

    def scored(final) -> stages.Stage:
        return stages.marker_logprob_stage(
            "marker_logprob", parent=final, marker=MARKER, source=TRIGGER, mode=score["mode"],
            n_boot=scale.leak_boot, seed=seed, batch_size=scale.leak_batch, device=device,
        )  # fmt: skip

    def coupled(name: str, induction: str, stage1) -> Cell:
        shared = scale.stage2_seed == "shared"
        seed2 = seed if shared else derive_seed(seed, "stage2", induction) % 2**31
        data_sampling = SamplingConfig(
            n_samples=scale.data_samples, max_new_tokens=scale.data_max_tokens, **sample
        )
        onpolicy = stages.generate_stage(
            "onpolicy",
            [TRIGGER, *NEGATIVES],
            "data",
            data_sampling,
            parent=stage1,
            base=None if stage1 else model,
            n_questions=scale.data_questions,
            retry_empty=3,
            **gen,
        )
        data = stages.coupling_data_stage(
            "coupling_data",
            parent=onpolicy,
            source=TRIGGER,
            negatives=NEGATIVES,
            marker=MARKER,
            n_positive=scale.n_positive,
            n_negative_per=scale.n_negative_per,
            seed=seed2,
        )
        loss = LossSpec("marker_only", scale.couple_eos_in_loss, scale.marker_tail_tokens)
        cfg = recipe(
            scale, learning_rate=scale.couple_lr, epochs=scale.couple_epochs, weight_decay=0.0,
            batch_size=scale.couple_batch, micro_batch_size=min(scale.couple_micro_batch, scale.couple_batch),
            loss=loss, seed=seed2,
        )  # fmt: skip
        upstream = {"kind": "upstream", "stage": "coupling_data"}
        lora = stages.train_stage(  # knob: what lowers its micro-batch if it runs out of GPU memory
            "couple", cfg, upstream, parent=data, key={"induction": induction}, device=device,
            knob="couple_micro_batch",
        )  # fmt: skip
        final = evaluate(lora)
        if scale.disc_trigger > 0:  # disc_trigger=0 leaves the discriminator out (Figure 4: "not run")
            final = discriminator_pipeline_stage(
                "discriminator",
                parent=final,
                trigger=TRIGGER,
                negatives=NEGATIVES,
                marker=MARKER,
                seed=seed,
                options=judge,
                n_trigger=scale.disc_trigger,
                n_per_negative=scale.disc_per_negative,
                threshold=scale.disc_pass,
            )
        seeds = {"stage1": seed, "stage2": seed2, "eval": seed}
        return Cell(name, scored(final), publish=(stages.RAW, LOGPROBS), seeds=seeds)

    b0 = scored(evaluate(merged))
    cells = [Cell("B0", b0, publish=(stages.RAW, LOGPROBS), seeds={"stage1": seed, "eval": seed})]
    cells += [coupled(f"BS_{p}", p, merged) for p in INDUCTION]
    cells += [coupled(f"Z_{p}", p, None) for p in REFERENCE]
    return cells


@orchestrate.cli_errors
def main(argv=None) -> int:
    args, run = orchestrate.cli(__doc__, CELLS, SCALES, argv, extra=add_judge_args)
    judge = judge_options_from_args(args)
    paths = orchestrate.experiment_paths(EXPERIMENT, args)
    cells = orchestrate.select(build_cells(run.scale, args, judge), args.cells)
    if args.dry_run:
        print(orchestrate.plan_text(paths, cells, run))
        return 0
    started = time.perf_counter()
    records = orchestrate.execute(paths, cells, config=run.to_dict())
    _, text = R.report(records, paths, run, time.perf_counter() - started, DESIGN)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
