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

The stage record says which rows were trained on: the hub commit read (a branch
or tag is resolved to its sha, and that sha is what is streamed), the shuffle, and
the rows skipped as invalid. A shuffled local source is an exact seeded permutation;
a shuffled hub stream is ``datasets``' approximation - shards in a seeded order, rows
drawn from a seeded buffer of ``shuffle_buffer`` rows, so a row moves at most about a
buffer's length from its place in the shard interleave.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explore_persona_space.errors import InputError, MissingFileError
from explore_persona_space.paths import REPO_ROOT
from explore_persona_space.personas import persona_prompt
from explore_persona_space.seeds import derive_seed

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
STREAM_SHUFFLE_BUFFER = 10_000  # rows; a hub stream's shuffle reads this many before its first row
SKIPPED_SHOWN = 5  # skipped rows whose reasons the stage record quotes
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class ChatFormatError(InputError):
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


def _row_messages(row: Any) -> list[dict[str, str]]:
    if not isinstance(row, Mapping):
        raise ChatFormatError(f"expected an object with a 'messages' list, got {type(row).__name__}")
    messages = row.get("messages")
    # A hub card that declares the turns as a ``Sequence`` of a struct decodes to columns, not rows.
    if isinstance(messages, Mapping) and {"role", "content"} <= set(messages):
        pairs = zip(messages["role"], messages["content"], strict=True)
        messages = [{"role": r, "content": c} for r, c in pairs]
    return validate_messages(messages)


# ----------------------------------------------------------------------------- JSON lines
def _json_problem(exc: json.JSONDecodeError) -> str:
    truncated = exc.msg.startswith("Unterminated") or exc.pos >= len(exc.doc.rstrip())
    return f"not valid JSON ({exc.msg}, column {exc.colno}{'; the record is cut off' if truncated else ''})"


def read_jsonl(path: Path, limit: int | None = None, *, chat: bool = False) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; blank lines skipped; errors name ``file:line``.

    By default a record only has to be an object with a ``messages`` list and is
    returned whole, because datasets built upstream carry marker spans and
    origins the loss masks need. ``chat=True`` validates every chat (roles,
    contents, final assistant turn) and returns just ``{"messages": ...}``.
    """
    out = []
    for line_no, rec in _jsonl_lines(path):
        if not isinstance(rec, dict):
            raise ChatFormatError(f"{path}:{line_no}: expected an object with a 'messages' list")
        if chat:
            try:
                rec = {"messages": validate_messages(rec.get("messages"))}
            except ChatFormatError as exc:
                raise ChatFormatError(f"{path}:{line_no}: {exc}") from None
        elif not isinstance(rec.get("messages"), list):
            raise ChatFormatError(f"{path}:{line_no}: expected an object with a 'messages' list")
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out


def _jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` per non-blank line; a line that is not JSON names ``file:line``."""
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ChatFormatError(f"{path}:{line_no}: {_json_problem(exc)}") from None


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
        raise MissingFileError(f"{ref}: no such file (looked at {resolved})")
    if ref.count("/") != 1 or not all(ref.split("/")):
        raise ValueError(f"{ref!r} is neither an existing local path nor a hub dataset id (owner/name)")
    return None


def hub_dataset_sha(hub_id: str, revision: str | None) -> str:
    """The commit a hub dataset's ``revision`` (None: its default branch) names now: what a stage reads.

    The module's one hub API call (tests stub ``HfApi.dataset_info``). A full 40-hex sha is taken as
    it is, so a pinned revision needs no API, e.g. offline from a filled datasets cache.
    """
    if revision is not None and COMMIT_SHA.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi

    try:
        sha = HfApi().dataset_info(hub_id, revision=revision).sha
    except Exception as exc:
        exc.add_note(f"{hub_id}: resolving revision {revision or 'main'!r} failed; pin a 40-hex commit sha")
        raise
    if not sha:
        raise RuntimeError(f"{hub_id}: the hub gave no commit sha for revision {revision or 'main'!r}")
    return sha


Rows = Iterable[tuple[str, Any]]  # (where: the label and row, for errors; the row)


def _open_hub(
    source: str, hub_id: str, split: str, revision: str | None, shuffle: tuple[int, int] | None
) -> tuple[Rows, str, dict[str, Any]]:
    from datasets import load_dataset

    sha = hub_dataset_sha(hub_id, revision)
    label = f"{source} ({hub_id}, split {split})" if hub_id != source else f"{hub_id} (split {split})"
    rows = load_dataset(hub_id, split=split, revision=sha, streaming=True)  # the recorded commit, no other
    record: dict[str, Any] = {"source": source, "hub_id": hub_id, "split": split, "revision": sha}
    if revision is not None and revision != sha:
        record["requested_revision"] = revision
    if shuffle is not None:  # approximate: seeded shard order + a seeded buffer (module docstring)
        seed, buffer = shuffle
        rows = rows.shuffle(seed=seed, buffer_size=buffer)
        record["shuffle"] = {"seed": seed, "buffer": buffer, "exact": False}
        label += f", shuffled stream (seed {seed}, buffer {buffer}; row = position in it)"
    return ((f"{label} row {i}", r) for i, r in enumerate(rows)), label, record


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` per non-blank line of a JSON-lines file; where = ``file:line: row j``.

    Read here, line by line, rather than by ``datasets``: its Arrow reader names neither the
    file nor the line of a broken record ("JSON parse error ... in row 1").
    """
    for row, (line_no, rec) in enumerate(_jsonl_lines(path)):
        yield f"{path}:{line_no}: row {row}", rec


def _json_error(path: Path) -> str | None:
    """Where a local ``.json`` file breaks (``file:line: problem``): ``datasets`` names neither."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"{path}: cannot read ({exc})"
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"{path}:{exc.lineno}: {_json_problem(exc)}"
        return None
    try:
        for _ in _jsonl_rows(path):
            pass
    except ChatFormatError as exc:
        return str(exc)
    return None


def _guarded(rows: Rows, local: Path) -> Rows:
    """A local file's rows; a reader error becomes one line naming the file (and line, for JSON)."""
    try:
        yield from rows
    except (ChatFormatError, KeyboardInterrupt):
        raise
    except Exception as exc:  # pyarrow / datasets errors carry neither the file nor a line
        where = _json_error(local) if local.suffix == ".json" else None
        what = f"{local}: cannot be read as a chat dataset ({type(exc).__name__}: {exc})"
        raise ChatFormatError(where or what) from None


def _open_rows(
    source: str, split: str | None, revision: str | None, shuffle: tuple[int, int] | None
) -> tuple[Rows, str, dict[str, Any]]:
    """``(where, row)`` pairs for ``source``, the label its errors carry, and what the stage records."""
    from datasets import load_dataset

    hub_id, default_split = HF_CHAT_SOURCES.get(source, (source, "train"))
    local = None if source in HF_CHAT_SOURCES else local_path(source)
    split = split or default_split
    if local is None:
        return _open_hub(source, hub_id, split, revision, shuffle)
    if revision is not None:
        raise ValueError(f"{source}: 'revision' applies to hub datasets, not to a local path")
    record: dict[str, Any] = {"source": source, "split": split, "revision": None}
    if local.is_file() and local.suffix == ".jsonl":
        rows: Rows = _jsonl_rows(local)
        if shuffle is not None:  # an exact seeded permutation; "row j" is still the file's row j
            import numpy as np

            table = list(rows)
            order = np.random.default_rng(shuffle[0]).permutation(len(table))
            record["shuffle"] = {"seed": shuffle[0], "exact": True, "source_rows": len(table)}
            rows = (table[int(j)] for j in order)
        return rows, str(local), record
    if local.is_dir():  # a downloaded snapshot of a hub dataset, for pods without network
        args, label = {"path": str(local)}, f"{local} (split {split})"
    elif (builder := LOCAL_BUILDERS.get(local.suffix)) is not None:
        args, label = {"path": builder, "data_files": {split: str(local)}}, str(local)
    else:
        raise ValueError(f"{local}: unsupported file type; expected one of {', '.join(LOCAL_BUILDERS)}")
    if shuffle is None:
        stream = load_dataset(**args, split=split, streaming=True)
        return _guarded(((f"{label} row {i}", r) for i, r in enumerate(stream)), local), label, record
    # An exact permutation needs the row count: the file becomes a memory-mapped Arrow table (in the
    # datasets cache) read in a seeded order, and "row j" in an error is still the file's row j.
    import numpy as np

    table = load_dataset(**args, split=split)
    order = np.random.default_rng(shuffle[0]).permutation(len(table))
    record["shuffle"] = {"seed": shuffle[0], "exact": True, "source_rows": len(table)}
    return ((f"{label} row {int(j)}", table[int(j)]) for j in order), label, record


def _check_n(n: Any, what: str) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"{what}: 'n' must be a positive integer or absent, got {n!r}")


@dataclass(frozen=True)
class ChatRows:
    """Chats read from a source, and what the training stage records about the reading."""

    chats: list[dict[str, Any]]
    record: dict[str, Any] = field(default_factory=dict)


def _row_id(row: Mapping[str, Any]) -> str:
    """A source's own row id (Tulu-3 and UltraChat carry one): a shuffled position alone finds no row."""
    rid = row.get("id", row.get("prompt_id")) if isinstance(row, Mapping) else None
    return f" (id {rid!r})" if isinstance(rid, str | int) and not isinstance(rid, bool) else ""


def _short(where: str, label: str) -> str:
    """``where`` without the source's label: ``line 5: row 4`` (a JSON-lines file) or ``row 4``."""
    rest = where.removeprefix(label)
    return f"line {rest[1:]}" if rest.startswith(":") else rest.strip()


def read_chat_source(
    source: str,
    n: int | None = None,
    *,
    split: str | None = None,
    revision: str | None = None,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = STREAM_SHUFFLE_BUFFER,
    skip_invalid: bool = False,
) -> ChatRows:
    """The first ``n`` chats of a benign SFT source (after the seeded shuffle, if any), with a record.

    ``source`` is a short name of :data:`HF_CHAT_SOURCES` (``tulu3``, ``ultrachat``), a hub dataset
    id, or a local json/jsonl/parquet file or snapshot directory. A bad row raises a ChatFormatError
    naming the source, the row (0-based: a local file's row, a hub stream's position), its id if it
    has one, and the field; ``skip_invalid`` drops such rows instead, ``n`` then counts kept rows,
    and the record carries the count and the first reasons.
    """
    _check_n(n, source)
    shuffle = None if shuffle_seed is None else (shuffle_seed, shuffle_buffer)
    rows, label, record = _open_rows(source, split, revision, shuffle)
    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    for where, row in rows:
        try:
            out.append({"messages": _row_messages(row)})
        except ChatFormatError as exc:
            where += _row_id(row)
            if not skip_invalid:
                raise ChatFormatError(f"{where}: {exc}") from None
            skipped.append(f"{_short(where, label)}: {exc}")
        if n is not None and len(out) >= n:
            break
    if skipped:
        log.warning("%s: skipped %d invalid rows (first: %s)", label, len(skipped), skipped[0])
    if not out:
        why = f"all {len(skipped)} rows are invalid" if skipped else "the source has no rows (an empty file?)"
        raise ChatFormatError(f"{label}: no chats to train on: {why}")
    if n is not None and len(out) < n:
        log.warning("%s: %d chats asked for, the source has only %d", label, n, len(out))
    log.info("%s: %d chats", label, len(out))
    record |= {"rows_read": len(out) + len(skipped), "kept": len(out), "skipped": len(skipped)}
    record["skipped_first"] = skipped[:SKIPPED_SHOWN]
    return ChatRows(out, record)


def load_chat_source(source: str, n: int | None = None, **options: Any) -> list[dict[str, Any]]:
    """The chats of :func:`read_chat_source` without its record."""
    return read_chat_source(source, n, **options).chats


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
        if not out:
            raise ChatFormatError(f"{local}: no chats to train on: the file has no records (an empty file?)")
        log.info("%s: %d chats", local, len(out))
        return out
    return load_chat_source(path, n, split=split)


def file_fingerprint(path: str) -> dict[str, Any] | None:
    """MD5 and SHA-256 of a local data file (None for a hub id): what a training stage records."""
    import hashlib

    local = None if path in HF_CHAT_SOURCES else local_path(path)  # "tulu3" names no file
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


@dataclass(frozen=True)
class RowOptions:
    """Which rows of a stage-1 chat source a stage reads: a script's ``Scale`` holds one for ``--set``.

    At the defaults :func:`hf_chat_spec` adds no key, so stage keys from before the options stay valid.
    """

    revision: str | None = None  # hub branch, tag or commit sha; the commit read is recorded either way
    shuffle: bool = False  # seeded from the run seed; exact for a local file, buffer-approximate for a stream
    shuffle_buffer: int = STREAM_SHUFFLE_BUFFER  # hub streams only
    skip_invalid: bool = False  # drop invalid rows, counted in the stage record, instead of stopping

    def __post_init__(self) -> None:
        if isinstance(self.shuffle_buffer, bool) or self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be a positive integer, got {self.shuffle_buffer!r}")


def hf_chat_spec(source: str, n: int, rows: RowOptions | None = None, *, seed: int | None = None) -> dict:
    """The ``hf_chat`` spec for ``n`` chats of ``source``, options at their defaults adding no key.

    The shuffle seed derives from the run ``seed``: two scripts at one seed share the stage.
    """
    rows = rows or RowOptions()
    spec: dict[str, Any] = {"kind": "hf_chat", "source": source, "n": n}
    if rows.revision is not None:
        spec["revision"] = rows.revision
    if rows.shuffle:
        if seed is None:
            raise ValueError(f"{source}: a shuffled source needs the run seed to derive its shuffle seed")
        spec["shuffle_seed"] = derive_seed(seed, "hf_chat", "shuffle") % 2**32
        spec["shuffle_buffer"] = rows.shuffle_buffer
    if rows.skip_invalid:
        spec["skip_invalid"] = True
    return spec


def _check_chat_options(spec: Mapping[str, Any]) -> None:
    def count(key: str, low: int) -> bool:
        v = spec.get(key, low)
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    bad = [k for k, low in (("shuffle_seed", 0), ("shuffle_buffer", 1)) if not count(k, low)]
    bad += [k for k in ("skip_invalid",) if not isinstance(spec.get(k, False), bool)]
    bad += [k for k in ("revision", "split") if not isinstance(spec.get(k, ""), str)]
    if bad:
        raise ValueError(f"data spec 'hf_chat': bad value for {bad}: {dict(spec)}")
    if "shuffle_buffer" in spec and "shuffle_seed" not in spec:
        raise ValueError(f"data spec 'hf_chat': 'shuffle_buffer' without 'shuffle_seed': {dict(spec)}")


def hf_chat_data(ctx: Any, spec: Mapping[str, Any]) -> ChatRows:
    """Data kind ``hf_chat`` (see :func:`hf_chat_spec`): ``{"source", "n", "split"?, "revision"?,
    "shuffle_seed"?, "shuffle_buffer"?, "skip_invalid"?}``; ``n`` is required, or a whole hub mixture
    would stream into memory.
    """
    optional = {"split", "revision", "shuffle_seed", "shuffle_buffer", "skip_invalid"}
    _check_spec(spec, {"source", "n"}, optional)
    _check_chat_options(spec)
    return read_chat_source(
        spec["source"],
        spec["n"],
        split=spec.get("split"),
        revision=spec.get("revision"),
        shuffle_seed=spec.get("shuffle_seed"),
        shuffle_buffer=spec.get("shuffle_buffer", STREAM_SHUFFLE_BUFFER),
        skip_invalid=spec.get("skip_invalid", False),
    )


def em_jsonl_data(ctx: Any, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Data kind ``em_jsonl``: ``{"path": local JSONL or hub id, "n"?, "split"?, "system"?}``.

    ``system`` names a registered persona whose prompt becomes every chat's system turn (EM
    induction under a persona, #205); without it the chats train as stored, and the spec - so
    the stage key - is the one every earlier EM stage used.
    """
    _check_spec(spec, {"path"}, {"n", "split", "system"})
    chats = load_em_source(spec["path"], spec.get("n"), split=spec.get("split"))
    if "system" not in spec:
        return chats
    return [
        with_system(chat, persona_prompt(spec["system"]), spec["path"], i) for i, chat in enumerate(chats)
    ]


def with_system(chat: Mapping[str, Any], system: str, source: str, row: int) -> dict[str, Any]:
    """The chat with ``system`` as its first turn; a chat that already has a system turn is an error."""
    messages = chat["messages"]
    if messages and messages[0]["role"] == "system":
        raise ChatFormatError(
            f"{source}: row {row}: messages[0]: already a system turn; cannot add a persona"
        )
    return {**chat, "messages": [{"role": "system", "content": system}, *messages]}
