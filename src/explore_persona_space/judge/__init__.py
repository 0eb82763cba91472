"""LLM judges: the #247 marker-stripped discriminator (Claude, and an offline classifier), the Betley judge.

Modules: ``client`` (Claude SDK wrapper: settings, retries, accounting),
``prompts`` (versioned templates from ``data/judge_prompts``), ``cache``
(content-addressed on-disk replies), ``runner`` (cache + concurrency),
``batch`` (Message Batches with crash resumption), ``batch_submit`` (the
recorded create, and finding a batch whose create timed out), ``discriminator``
(sampling, marker stripping, verdict parsing, accuracy), ``offline`` (TF-IDF +
logistic regression, no API), ``alignment`` (aligned/coherent scores and the
misaligned rate), ``stage`` (what an orchestrator calls per cell, and the
shared ``--judge*`` flags).

Importing this package imports neither the SDK nor scikit-learn; the stages load
them when they run.
"""

from explore_persona_space.judge.stage import (
    JUDGE_CHOICES,
    JudgeConfigError,
    JudgeOptions,
    add_judge_args,
    alignment_pipeline_stage,
    alignment_stage,
    discriminator_columns,
    discriminator_headers,
    discriminator_pipeline_stage,
    discriminator_stage,
    judge_options_from_args,
)

__all__ = [
    "JUDGE_CHOICES",
    "JudgeConfigError",
    "JudgeOptions",
    "add_judge_args",
    "alignment_pipeline_stage",
    "alignment_stage",
    "discriminator_columns",
    "discriminator_headers",
    "discriminator_pipeline_stage",
    "discriminator_stage",
    "judge_options_from_args",
]
