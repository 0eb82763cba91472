"""On-disk cache of judge replies, one content-addressed file per request.

The key is a SHA-256 over the judge model, the prompt template's version hash,
the exact inputs and the sampling settings, so a rerun of the same judgement is
free and a changed prompt, model or setting is always a miss.

What is cached is the judge's raw reply (text, stop reason, served model id,
token usage), not a parsed verdict: a fix to a parser applies to old replies
without paying for them again. Replies that parse as refusals or garbage are
cached only for requests sent at temperature 0, where asking again buys the
same answer (they are counted as rejected every time they are read); at a
sampling temperature - the fixed default of current models - they are asked
again on the next run (the policy lives in ``runner``). Transport failures
(429/5xx after all retries, timeouts) are never cached.

Two processes may write the same key at once: each writes its own temporary file
and renames it into place, so the survivor is one complete file. A reader checks
that the file parses, that it names its own key and that its record matches the
stored digest; anything else (a torn or hand-edited file) is a miss, never a
verdict.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from explore_persona_space.results import atomic_write_text

log = logging.getLogger(__name__)

CACHE_SCHEMA = 1


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _digest(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj).encode("utf-8")).hexdigest()


def cache_key(
    *, model: str, prompt_version: str, inputs: Mapping[str, Any], sampling: Mapping[str, Any]
) -> str:
    """64 hex characters; also usable as a Message Batches ``custom_id``."""
    return _digest(
        {
            "schema": CACHE_SCHEMA,
            "model": model,
            "prompt_version": prompt_version,
            "inputs": dict(inputs),
            "sampling": dict(sampling),
        }
    )


class JudgeCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("judge cache: unreadable entry %s (%s); treating as a miss", path, exc)
            return None
        ok = (
            isinstance(doc, dict)
            and doc.get("schema") == CACHE_SCHEMA
            and doc.get("key") == key
            and isinstance(doc.get("record"), dict)
            and doc.get("digest") == _digest(doc["record"])
        )
        if not ok:
            log.warning("judge cache: entry %s fails its integrity check; treating as a miss", path)
            return None
        return doc["record"]

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        record = dict(record)
        doc = {"schema": CACHE_SCHEMA, "key": key, "digest": _digest(record), "record": record}
        atomic_write_text(self.path(key), _canonical(doc) + "\n")
