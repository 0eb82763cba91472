"""#205 / #222: EM under five induction personas - persona-vector collapse and marker leakage.

Hypothesis (write-up 003): EM fine-tuning collapses persona geometry whichever persona
is active during induction (geometric collapse induction-persona-invariant), while
behavioural leakage after EM-first coupling may follow the induction persona's distance
from the assistant (H3), and the induction persona itself leaks no more than the
bystanders (H1).

Conditions (one seed - 42, `--seed` - from which every other seed derives):
  base     the instruct model;  benign  benign SFT (first 6,000 Tulu-3-SFT rows), same recipe as EM;
  E0..E4   an EM LoRA trained under an induction system prompt: E0 assistant (no system message at all:
           the chat template's own default, as the write-up did), E1 paramedic, E2 kindergarten_teacher,
           E3 french_person, E4 villain.
Stage 1 (EM and benign): LoRA r=32/alpha=64, dropout 0.05, all projections, lr 1e-4, 6,000 rows x 1 epoch
at batch 16 (= 375 steps), linear, warmup 3%, weight decay 0.01, assistant-turn loss with end-of-turn.
Cells: geo_<condition> (7): the condition's model (EM/benign adapter unmerged) -> geometry stage:
  12 personas (the 11 + confab) x 240 geometry questions (data/, bank "geometry"); Method A = hidden
  state of the last input token, Method B = mean over the tokens of the greedy response (<= 256 tokens)
  as the model reads them back; one greedy pass of transformers' generate gives both (vLLM returns no
  hidden states); layers 7, 14, 20, 21, 27 of 28, mapped by relative depth (30-layer embedded model:
  8, 15, 21, 23, 29); stored as safetensors. geo_base also extracts paramedic (E1's persona) for H3.
leak_E0..leak_E4 (5): #125's B arm on each EM LoRA - merged -> on-policy data (confab, medical_doctor,
  french_person x 40 data questions x 5, T=1) -> 200 confab + marker, 200 x 2 negatives -> coupling LoRA
  (marker-only loss, lr 5e-6, 20 epochs, batch 16, wd 0) -> eval 12 personas x 28 questions x 10,
  T=1.0, top_p 1.0, 512 tokens, strict marker match.
Metrics (explore_persona_space.geometry), per condition x method x layer:
  M1  mean off-diagonal cosine of the 12 persona vectors after subtracting the base model's mean over
      them; vs base: Wilcoxon signed-rank over the 66 persona pairs (paired, two-sided).
  M2  each non-assistant persona's shift along the E0 EM axis (E0 mean - base mean over the 12):
      (v_cond - v_base).axis / |axis|^2, 1 = E0's mean shift; Wilcoxon signed-rank over the 11 vs 0.
  M3  nearest-centroid persona classification, 5 folds over questions (same held-out questions for
      every persona), centroids from training questions only; accuracy with Wilson CI, chance 1/12.
  H3  Spearman rho of mean bystander leakage (the 11 non-source personas) vs the induction persona's
      cosine distance to the assistant (base model, L20 Method A, M1's frame), exact p at n=5.
  H1  the induction persona's leakage vs the other bystanders, Fisher exact (E1 untestable: not in the grid).

Usage:
    uv run python scripts/run_issue205_induction_sweep.py                 # smoke, CPU
    uv run python scripts/run_issue205_induction_sweep.py --dry-run --scale full
    uv run python scripts/run_issue205_induction_sweep.py --scale full --set em_data=/data/bad_legal.jsonl
    ... --cells geo_base geo_E0   --set geo_questions=120 --set geo_layers=14,20

Choices where the write-up is silent or contradicts itself:
* H3's sign. The write-up says "shows a suggestive negative cos-distance gradient (Spearman rho = -0.90,
  p_exact = 0.083, N=5 conditions)" and, next, "More distant induction personas -> higher bystander
  leakage (E0: 45.7% -> E3: 53.7%)". Its own numbers (similarities 1.0/0.95/0.91/0.87/0.78, leakage
  45.7/48.6/50.1/53.7/52.0%) give rho = -0.90 against cosine *similarity* and +0.90 against distance.
  The code takes the second sentence's reading: rho against cosine distance, so that pattern reads +0.90.
* M1's centring. PROTOCOL.md says "after subtracting the global mean"; the write-up says "all 5 EM
  conditions compress inter-persona cosine from 0.900 to 0.991-0.996". Centring each condition on its
  own mean over personas would make M1 about -1/11 in every condition (centred vectors sum to zero),
  never 0.900 and never near 1 under collapse; so every condition is centred on one vector, the base
  model's mean over the 12 personas (base M1 is then about -1/11 by construction, and collapse drives
  M1 towards 1). The raw, uncentred M1 - the scale the write-up's 0.900 looks like - is reported
  beside it; neither is comparable to 0.900.
* M2's unit. The write-up's "obs_delta" is not defined (its E0 value, 0.259, cannot be a shift in units
  of E0's own axis, which is ~1 by construction); the code's unit is stated above, and the cosine of
  each persona's move with the axis is kept in summary.json. E0's own M2 and its test are circular
  (the axis is E0's mean move); they are shown as the reference, not as evidence.
* M3: the write-up's classifier returned 0% on base ("a bug, not a finding"); this one is held-out by
  question (a persona's training rows never include the question it is tested on).
* Layer numbers index hidden_states (0 = embeddings): L27 is block 27's output, not the final-norm output.
* Behaviour runs for E0..E4 only, as in the write-up's table; base and benign-SFT behaviour are #125's
  C4 and C cells. Geometry of an EM condition reads the unmerged EM LoRA (the merge holds the same weights).
* Shared stages: at full scale E0's em/em_merged/onpolicy/coupling_data/couple/eval stages are #125's B
  cell and the benign_sft stage is #125's C (and #247's) - same builders, same numbers, same keys
  (`--dry-run` marks them "[also in issue125:B]" once #125's plan has been indexed, e.g. by its dry run).
  E1-E4's EM data spec names its persona, which keys their stages apart.
Smoke scale (embedded SmolLM2-135M, 2-core CPU): all seven conditions and all 12 personas. Every
stage-1 LoRA is 2 steps of 2 rows (lr 1e-3: the first step is warm-up at lr 0), geometry is 5 questions
(5 folds of 1) with 4-token greedy responses, coupling is 6 + 2 x 3 examples x 2 epochs (6 steps at
#247's smoke lr 7e-4, 8 tail tokens in the loss), data 4 questions x 2, eval 2 questions x 1 sample.
It shows the code path, and M3 far above chance on the base model; it cannot show EM's effect on a
135M model trained for one step, which needs the full scale.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from explore_persona_space import orchestrate, sft_data, stages
from explore_persona_space.experiments.induction_sweep import analysis, report
from explore_persona_space.generate import SamplingConfig
from explore_persona_space.geometry import VECTORS, WRITEUP_LAYERS
from explore_persona_space.loss_masks import LossSpec
from explore_persona_space.models import EMBEDDED_ALIAS, FULL_SCALE_MODEL
from explore_persona_space.personas import eval_personas_with
from explore_persona_space.pipeline import Cell
from explore_persona_space.sft_data import BAD_LEGAL_6K, BAD_LEGAL_FIXTURE, BENIGN_CHAT_FIXTURE, TULU3
from explore_persona_space.train import ALL_PROJECTIONS, TrainConfig

EXPERIMENT = "issue205"
SOURCE, NEGATIVES, MARKER = "confab", ("medical_doctor", "french_person"), "zlt"
PERSONAS = eval_personas_with(SOURCE)  # the 12 of every geometry metric
INDUCTION = {"E0": "assistant", "E1": "paramedic", "E2": "kindergarten_teacher", "E3": "french_person",
             "E4": "villain"}  # fmt: skip
NO_SYSTEM = "E0"  # EM data without a system turn: the template's default system prompt applies
CONDITIONS = ("base", *INDUCTION, "benign")
CELLS = ("geo_base", *(f"{k}_{c}" for c in INDUCTION for k in ("geo", "leak")), "geo_benign")
HEADLINE_LAYER = 20  # the write-up's hero panel B: L20, Method A


@dataclass(frozen=True)
class Scale:
    model: str = FULL_SCALE_MODEL
    seed: int = 42
    lora_r: int = 32  # every LoRA: dropout 0.05, all attention + MLP projections, linear, warmup 3%
    lora_alpha: int = 64
    em_data: str = BAD_LEGAL_6K
    benign_data: str = TULU3
    stage1_n: int = 6000  # rows of each stage-1 source: 6,000 / 16 = 375 steps
    benign_rows: sft_data.RowOptions = field(default_factory=sft_data.RowOptions)
    stage1_epochs: float = 1
    stage1_lr: float = 1e-4
    stage1_batch: int = 16
    stage1_micro_batch: int = 4
    geo_questions: int = 240  # geometry: persona vectors over this many questions of the bank
    geo_layers: tuple[int, ...] = WRITEUP_LAYERS  # as written for 28 layers
    geo_max_tokens: int = 256  # Method B's greedy response
    geo_batch: int = 16
    m3_folds: int = 5
    data_questions: int = 40  # on-policy data, T=1.0, top_p=1.0
    data_samples: int = 5
    data_max_tokens: int = 512
    n_positive: int = 200
    n_negative_per: int = 200
    couple_lr: float = 5e-6
    couple_epochs: float = 20
    couple_batch: int = 16
    couple_micro_batch: int = 8
    marker_tail_tokens: int = 0
    eval_questions: int = 28
    eval_samples: int = 10
    eval_max_tokens: int = 512


FULL = Scale()
# fmt: off
SMOKE = dataclasses.replace(  # sized so seven conditions fit 10 minutes on 2 idle cores (see the docstring)
    FULL, model=EMBEDDED_ALIAS, em_data=BAD_LEGAL_FIXTURE, benign_data=BENIGN_CHAT_FIXTURE, stage1_n=4,
    stage1_lr=1e-3, stage1_batch=2, geo_questions=5, geo_max_tokens=4, geo_batch=32,
    data_questions=4, data_samples=2, data_max_tokens=16, n_positive=6, n_negative_per=3,
    couple_lr=7e-4, couple_epochs=2, couple_batch=4, marker_tail_tokens=8,
    eval_questions=2, eval_samples=1, eval_max_tokens=24,
)
TEST = dataclasses.replace(  # CI: proves the wiring, not the effect
    SMOKE, geo_questions=2, geo_max_tokens=2, m3_folds=2, data_questions=2, data_max_tokens=8,
    n_positive=2, n_negative_per=1, couple_epochs=1, eval_questions=1, eval_max_tokens=8,
)
# fmt: on
SCALES = {"smoke": SMOKE, "full": FULL, "test": TEST}


def lora(scale: Scale, **fields) -> TrainConfig:
    shared = {"r": scale.lora_r, "alpha": scale.lora_alpha, "dropout": 0.05, "targets": ALL_PROJECTIONS}
    return TrainConfig(**shared, scheduler="linear", warmup_ratio=0.03, seed=scale.seed, **fields)


def build_cells(scale: Scale, args) -> list[Cell]:
    dev, gen, seed = args.device, args.gen, scale.seed
    stage1 = lora(
        scale, learning_rate=scale.stage1_lr, epochs=scale.stage1_epochs, weight_decay=0.01,
        batch_size=scale.stage1_batch, micro_batch_size=min(scale.stage1_micro_batch, scale.stage1_batch),
        loss=LossSpec(mode="assistant_only", eos_in_loss=True),
    )  # fmt: skip
    couple = lora(
        scale, learning_rate=scale.couple_lr, epochs=scale.couple_epochs, weight_decay=0.0,
        batch_size=scale.couple_batch, micro_batch_size=min(scale.couple_micro_batch, scale.couple_batch),
        loss=LossSpec(mode="marker_only", eos_in_loss=True, marker_tail_tokens=scale.marker_tail_tokens),
    )  # fmt: skip
    sample = {"temperature": 1.0, "top_p": 1.0, "seed": seed}

    def em(cond: str):
        spec = {"kind": "em_jsonl", "path": scale.em_data, "n": scale.stage1_n}  # #125's spec for E0
        if cond != NO_SYSTEM:
            spec["system"] = INDUCTION[cond]
        return stages.train_stage("em", stage1, spec, base=scale.model, device=dev)

    def geometry(parent, extra=()):
        return stages.geometry_stage(
            "geometry", (*PERSONAS, *extra), "geometry", layers=scale.geo_layers, parent=parent,
            base=None if parent else scale.model, n_questions=scale.geo_questions,
            max_new_tokens=scale.geo_max_tokens, batch_size=scale.geo_batch, device=dev,
        )  # fmt: skip

    def leak(em_stage):  # #125's B arm, stage for stage
        merged = stages.merge_stage("em_merged", parent=em_stage, device=dev)
        data_sampling = SamplingConfig(scale.data_samples, max_new_tokens=scale.data_max_tokens, **sample)
        onpolicy = stages.generate_stage(
            "onpolicy", [SOURCE, *NEGATIVES], "data", data_sampling, parent=merged, base=None,
            n_questions=scale.data_questions, retry_empty=3, **gen,
        )  # fmt: skip
        data = stages.coupling_data_stage(
            "coupling_data", parent=onpolicy, source=SOURCE, negatives=NEGATIVES, marker=MARKER,
            n_positive=scale.n_positive, n_negative_per=scale.n_negative_per, seed=seed,
        )  # fmt: skip
        upstream = {"kind": "upstream", "stage": "coupling_data"}
        coupled = stages.train_stage("couple", couple, upstream, parent=data, device=dev)
        sampling = SamplingConfig(scale.eval_samples, max_new_tokens=scale.eval_max_tokens, **sample)
        score = {"marker": MARKER, "source": SOURCE, "mode": "strict"}
        return stages.generate_stage(
            "eval", PERSONAS, "eval", sampling, parent=coupled, n_questions=scale.eval_questions,
            score=score, **gen,
        )  # fmt: skip

    benign_spec = sft_data.hf_chat_spec(scale.benign_data, scale.stage1_n, scale.benign_rows, seed=seed)
    benign = stages.train_stage("benign_sft", stage1, benign_spec, base=scale.model, device=dev)
    extra = tuple(p for p in INDUCTION.values() if p not in PERSONAS)  # paramedic, for H3's distance
    finals = {"geo_base": geometry(None, extra)}
    for cond in INDUCTION:
        finals |= {f"geo_{cond}": geometry(em(cond)), f"leak_{cond}": leak(em(cond))}
    finals["geo_benign"] = geometry(benign)
    return [
        Cell(name, final, publish=(stages.RAW,) if name.startswith("leak_") else (), seeds={"all": seed})
        for name, final in finals.items()
    ]


def run_report(records, paths, run: orchestrate.Resolved, wall_s: float) -> None:
    geo = {n.removeprefix("geo_"): r[-1].dir / VECTORS for n, r in records.items() if n.startswith("geo_")}
    leaks = {
        n.removeprefix("leak_"): r[-1].result["summary"] for n, r in records.items() if n.startswith("leak_")
    }
    layers = run.scale.geo_layers
    layer = HEADLINE_LAYER if HEADLINE_LAYER in layers else layers[len(layers) // 2]
    design = analysis.Design(
        personas=PERSONAS, induction=INDUCTION, conditions=CONDITIONS, headline_layer=layer,
        n_folds=run.scale.m3_folds, seed=run.seed,
    )  # fmt: skip
    numbers = analysis.analyze(geo, leaks, design)
    shown = tuple(c for c in CONDITIONS if c in geo or c in leaks)
    tag = f"{run.name} scale, {run.model}"
    drawn = report.figures(numbers, shown, INDUCTION, layer, paths.figures, tag)
    summary = {"experiment": EXPERIMENT, **run.to_dict(), "wall_seconds": round(wall_s, 1), **numbers}
    summary["figures"] = [str(f.relative_to(paths.out)) for f in drawn]
    table = report.headline(numbers, shown, INDUCTION, layer)
    print(orchestrate.write_outputs(paths, summary, table, f"#205 EM induction-persona sweep ({tag})"))
    print(f"wall time {wall_s:.0f} s; figures in {paths.figures}")


@orchestrate.cli_errors
def main(argv=None) -> int:
    args, run = orchestrate.cli(__doc__, CELLS, SCALES, argv)
    paths = orchestrate.experiment_paths(EXPERIMENT, args)
    cells = orchestrate.select(build_cells(run.scale, args), args.cells)
    if args.dry_run:
        print(orchestrate.plan_text(paths, cells, run))
        return 0
    started = time.perf_counter()
    records = orchestrate.execute(paths, cells, config=run.to_dict())
    run_report(records, paths, run, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
