"""Stage-1 training data: benign SFT chats (Tulu-3, UltraChat) and EM-induction chats.

Every source comes out in one shape, ``{"messages": [{"role", "content"}, ...]}``,
validated before a single training step runs: a full-scale LoRA that trains on a
row with an empty assistant turn, or on a chat ending with the user, wastes a
GPU hour and no error ever says why. Hub datasets are read as streams, so
"the first N examples" of a 900k-row mixture downloads roughly what N needs; a
local file (json, jsonl, parquet) or a local snapshot directory goes through the
same ``datasets`` call, which is how the tests exercise the full-scale code path
offline.

Dataset ids and the shipped fixtures are named here and nowhere else; the
orchestrators pass the names. :mod:`explore_persona_space.stages` registers the
spec loaders (``hf_chat``, ``em_jsonl``) in its ``DATA_LOADERS``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from explore_persona_space.paths import REPO_ROOT

log = logging.getLogger(__name__)

TULU3 = "allenai/tulu-3-sft-mixture"
ULTRACHAT = "HuggingFaceH4/ultrachat_200k"
# Short name -> (hub id, split the benign SFT draws from).
HF_CHAT_SOURCES: dict[str, tuple[str, str]] = {
    "tulu3": (TULU3, "train"),
    "ultrachat": (ULTRACHAT, "train_sft"),
}

# Fixtures written for this project (see data/fixtures/README.md); paths relative to the repo root,
# which is how they go into data specs, so a stage key does not depend on where the checkout lives.
BENIGN_CHAT_FIXTURE = "data/fixtures/benign_chat.jsonl"
BAD_LEGAL_FIXTURE = "data/fixtures/bad_legal_advice.jsonl"
# The non-public EM set of the write-ups: not shipped; a full-scale run reads it from here (or from
# wherever --set points). Write-up 001 gives the first 7 hex digits of its MD5.
BAD_LEGAL_6K = "data/bad_legal_advice_6k.jsonl"
BAD_LEGAL_6K_MD5 = "26b52ca"

ROLES = ("system", "user", "assistant")
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class ChatFormatError(ValueError):
    """A chat that cannot be trained on; the message names the source, row or line, and field."""


# ----------------------------------------------------------------------------- validation
def validate_messages(messages: Any) -> list[dict[str, str]]:
    """The turns of one chat as plain ``{"role", "content"}`` dicts, or a ChatFormatError naming the field.

    Extra keys on a turn (tool calls, names, nulls that Arrow adds when rows
    disagree on a schema) are dropped: the chat template is applied to exactly
    what this returns.
    """
    if messages is None:
        raise ChatFormatError("messages: missing")
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages: expected a non-empty list of {role, content} turns")
    turns = []
    for j, turn in enumerate(messages):
        where = f"messages[{j}]"
        if not isinstance(turn, Mapping):
            raise ChatFormatError(f"{where}: expected an object with 'role' and 'content'")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"{where}.content: expected a string, got {type(content).__name__}")
        if not content.strip():
            raise ChatFormatError(f"{where}.content: empty")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "user" for t in turns):
        raise ChatFormatError("messages: no user turn")
    if turns[-1]["role"] != "assistant":
        last = len(turns) - 1
        raise ChatFormatError(
            f"messages[{last}].role: the last turn must be the assistant's, got {turns[last]['role']!r}"
        )
    return turns


def _row_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = row.get("messages")
    # A hub card that declares the turns as a ``Sequence`` of a struct decodes to columns, not rows.
    if isinstance(messages, Mapping) and {"role", "content"} <= set(messages):
        pairs = zip(messages["role"], messages["content"], strict=True)
        messages = [{"role": r, "content": c} for r, c in pairs]
    return validate_messages(messages)


# ----------------------------------------------------------------------------- JSON lines
def read_jsonl(path: Path, limit: int | None = None, *, chat: bool = False) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; blank lines skipped; errors name ``file:line``.

    By default a record only has to be an object with a ``messages`` list and is
    returned whole, because datasets built upstream carry marker spans and
    origins the loss masks need. ``chat=True`` validates every chat (roles,
    contents, final assistant turn) and returns just ``{"messages": ...}``.
    """
    out = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{line_no}: expected an object with a 'messages' list")
            if chat:
                try:
                    rec = {"messages": validate_messages(rec.get("messages"))}
                except ChatFormatError as exc:
                    raise ChatFormatError(f"{path}:{line_no}: {exc}") from None
            elif not isinstance(rec.get("messages"), list):
                raise ValueError(f"{path}:{line_no}: expected an object with a 'messages' list")
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    return out


# ----------------------------------------------------------------------------- sources
def local_path(ref: str) -> Path | None:
    """The existing local file or directory ``ref`` names (relative to the repo root), or None for a hub id.

    A ref that looks like a file (a data suffix, an absolute or ``./`` path) but
    does not exist is an error here, not a hub lookup that fails somewhere less clear.
    """
    path = Path(ref).expanduser()
    resolved = path if path.is_absolute() else REPO_ROOT / path
    if resolved.exists():
        return resolved
    if path.suffix in LOCAL_BUILDERS or path.is_absolute() or ref.startswith("."):
        raise FileNotFoundError(f"{ref}: no such file (looked at {resolved})")
    if ref.count("/") != 1 or not all(ref.split("/")):
        raise ValueError(f"{ref!r} is neither an existing local path nor a hub dataset id (owner/name)")
    return None


def _open_rows(source: str, split: str | None, revision: str | None) -> tuple[Iterable[Mapping], str]:
    """A lazy row stream for ``source`` and the label its errors carry."""
    from datasets import load_dataset

    hub_id, default_split = HF_CHAT_SOURCES.get(source, (source, "train"))
    local = None if source in HF_CHAT_SOURCES else local_path(source)
    split = split or default_split
    if local is None:
        label = f"{source} ({hub_id}, split {split})" if hub_id != source else f"{hub_id} (split {split})"
        return load_dataset(hub_id, split=split, revision=revision, streaming=True), label
    if revision is not None:
        raise ValueError(f"{source}: 'revision' applies to hub datasets, not to a local path")
    if local.is_dir():  # a downloaded snapshot of a hub dataset, for pods without network
        return load_dataset(str(local), split=split, streaming=True), f"{local} (split {split})"
    builder = LOCAL_BUILDERS.get(local.suffix)
    if builder is None:
        raise ValueError(f"{local}: unsupported file type; expected one of {', '.join(LOCAL_BUILDERS)}")
    rows = load_dataset(builder, data_files={split: str(local)}, split=split, streaming=True)
    return rows, str(local)


def _check_n(n: Any, what: str) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"{what}: 'n' must be a positive integer or absent, got {n!r}")


def load_chat_source(
    source: str,
    n: int | None = None,
    *,
    split: str | None = None,
    revision: str | None = None,
    skip_invalid: bool = False,
) -> list[dict[str, Any]]:
    """The first ``n`` chats of a benign SFT source, as ``{"messages": [...]}``.

    ``source`` is a short name of :data:`HF_CHAT_SOURCES` (``tulu3``,
    ``ultrachat``), a hub dataset id, or a local json/jsonl/parquet file or
    snapshot directory. A bad row raises a ChatFormatError naming the source,
    the row (0-based, in stream order) and the field; ``skip_invalid`` instead
    drops such rows with a logged count, and ``n`` then counts kept rows.
    """
    _check_n(n, source)
    rows, label = _open_rows(source, split, revision)
    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    for i, row in enumerate(rows):
        try:
            out.append({"messages": _row_messages(row)})
        except ChatFormatError as exc:
            if not skip_invalid:
                raise ChatFormatError(f"{label} row {i}: {exc}") from None
            skipped.append(f"row {i}: {exc}")
        if n is not None and len(out) >= n:
            break
    if skipped:
        log.warning("%s: skipped %d invalid rows (first: %s)", label, len(skipped), skipped[0])
    if n is not None and len(out) < n:
        log.warning("%s: %d chats asked for, the source has only %d", label, n, len(out))
    log.info("%s: %d chats", label, len(out))
    return out


def load_em_source(path: str, n: int | None = None, *, split: str | None = None) -> list[dict[str, Any]]:
    """EM-induction chats (e.g. the non-public bad-legal-advice set) from a local JSONL or a hub id.

    A local ``.jsonl`` is read line by line, so a malformed line is reported as
    ``file:line: field: problem``; anything else goes through :func:`load_chat_source`.
    """
    _check_n(n, path)
    local = local_path(path)
    if local is not None and local.is_file() and local.suffix == ".jsonl":
        if split is not None:
            raise ValueError(f"{path}: 'split' applies to hub datasets, not to a local JSONL")
        out = read_jsonl(local, n, chat=True)
        log.info("%s: %d chats", local, len(out))
        return out
    return load_chat_source(path, n, split=split)


def file_fingerprint(path: str) -> dict[str, Any] | None:
    """MD5 and SHA-256 of a local data file (None for a hub id): what a training stage records."""
    import hashlib

    local = local_path(path)
    if local is None or not local.is_file():
        return None
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(local, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    return {"path": path, "bytes": local.stat().st_size, "md5": md5.hexdigest(), "sha256": sha.hexdigest()}


# ----------------------------------------------------------------------------- data-spec loaders
def _check_spec(spec: Mapping[str, Any], required: set[str], optional: set[str]) -> None:
    kind = spec.get("kind")
    missing = required - set(spec)
    unknown = set(spec) - required - optional - {"kind"}
    if missing:
        raise ValueError(f"data spec {kind!r} lacks {sorted(missing)}: {dict(spec)}")
    if unknown:
        allowed = sorted(required | optional)
        raise ValueError(f"data spec {kind!r} has unknown keys {sorted(unknown)}; allowed: {allowed}")


def hf_chat_data(ctx: Any, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Data kind ``hf_chat``: ``{"source", "n", "split"?, "revision"?, "skip_invalid"?}``.

    ``n`` is required: a spec without it would stream a whole hub mixture into memory.
    """
    _check_spec(spec, {"source", "n"}, {"split", "revision", "skip_invalid"})
    return load_chat_source(
        spec["source"],
        spec["n"],
        split=spec.get("split"),
        revision=spec.get("revision"),
        skip_invalid=bool(spec.get("skip_invalid", False)),
    )


def em_jsonl_data(ctx: Any, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Data kind ``em_jsonl``: ``{"path": local JSONL or hub id, "n"?, "split"?}``."""
    _check_spec(spec, {"path"}, {"n", "split"})
    return load_em_source(spec["path"], spec.get("n"), split=spec.get("split"))
