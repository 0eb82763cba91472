"""House rules a reviewer checks first: the package is the single source of truth."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from explore_persona_space.personas import MARKERS, PERSONAS, question_bank_names, questions

ROOT = Path(__file__).resolve().parents[1]
MODEL_IDS = re.compile(r"Qwen/Qwen2\.5|HuggingFaceTB/SmolLM")


def registry_literals() -> list[str]:
    lits = [p.prompt for p in PERSONAS.values()] + list(MARKERS.values())
    lits += [q for bank in question_bank_names() for q in questions(bank)]
    return lits


def literal_hits(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    hits = [lit for lit in registry_literals() if lit in text]
    return hits + MODEL_IDS.findall(text)


def test_checker_catches_a_planted_literal(tmp_path):
    bad = tmp_path / "run_issue999_bad.py"
    bad.write_text('MARKER = "[ZLT]"\nMODEL = "Qwen/Qwen2.5-7B-Instruct"\nQ = "Why is the sky blue?"\n')
    assert set(literal_hits(bad)) == {"[ZLT]", "Qwen/Qwen2.5", "Why is the sky blue?"}


def test_scripts_hold_no_persona_marker_question_or_model_literals():
    offenders = {str(p.relative_to(ROOT)): literal_hits(p) for p in (ROOT / "scripts").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.slow  # a subprocess or a heavy import: seconds on 2 cores
def test_importing_the_package_does_not_import_torch():
    code = (
        "import sys, explore_persona_space.analyze, explore_persona_space.data, "
        "explore_persona_space.results, explore_persona_space.generate, explore_persona_space.generate_vllm; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
