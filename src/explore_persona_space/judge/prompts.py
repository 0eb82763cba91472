"""Judge prompt templates, shipped as text files in ``data/judge_prompts/``.

A template's version is the SHA-256 of its text, and the version is part of every
cache key: edit a prompt and every old verdict stops matching, without anyone
having to remember to bump a number. Placeholders use ``string.Template``
syntax (``$name``) so that braces and JSON in a completion are never touched;
substitution is strict, a missing or an unused placeholder is an error.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from explore_persona_space.paths import data_dir

PROMPT_DIR_NAME = "judge_prompts"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str

    @property
    def version(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def placeholders(self) -> frozenset[str]:
        found = set()
        for match in string.Template.pattern.finditer(self.text):
            name = match.group("named") or match.group("braced")
            if name:
                found.add(name)
        return frozenset(found)

    def render(self, **values: str) -> str:
        missing = self.placeholders - values.keys()
        extra = values.keys() - self.placeholders
        if missing or extra:
            raise ValueError(
                f"prompt {self.name!r}: missing placeholders {sorted(missing)}, unexpected {sorted(extra)}"
            )
        return string.Template(self.text).substitute(values)


def prompt_dir() -> Path:
    return data_dir() / PROMPT_DIR_NAME


@cache
def _load(name: str, directory: str) -> PromptTemplate:
    path = Path(directory) / f"{name}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in Path(directory).glob("*.txt"))
        raise FileNotFoundError(f"judge prompt {name!r} not found at {path}; available: {available}")
    return PromptTemplate(name=name, text=path.read_text(encoding="utf-8"))


def load_prompt(name: str, directory: Path | None = None) -> PromptTemplate:
    """The template ``<directory>/<name>.txt`` (default: the shipped ``data/judge_prompts``)."""
    return _load(name, str(directory or prompt_dir()))
