"""Result files: raw completions, run_result.json with provenance, atomic writes.

A file that exists under its final name is complete: every write goes to a
temporary name in the same directory, is fsynced, then renamed over the target.
A killed process leaves at worst a ``.tmp-*`` file, never a half-written result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from explore_persona_space.errors import InputError
from explore_persona_space.paths import REPO_ROOT

RAW_REQUIRED: dict[str, type] = {
    "persona": str,
    "question": str,
    "sample": int,
    "text": str,
}

PROVENANCE_PACKAGES = (
    "explore-persona-space",
    "torch",
    "transformers",
    "peft",
    "trl",
    "vllm",
    "datasets",
    "anthropic",
    "numpy",
    "scipy",
)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows it.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def to_json(obj: Any) -> str:
    # allow_nan=False: an undefined rate must be None (null), never NaN in a result file.
    return json.dumps(obj, indent=2, ensure_ascii=False, default=json_default, allow_nan=False) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj))


class RawCompletionsError(InputError):
    """A raw-completions file that does not have the expected shape."""


def validate_raw_completions(records: Any, source: str = "<records>") -> list[dict[str, Any]]:
    if not isinstance(records, list):
        raise RawCompletionsError(f"{source}: expected a JSON list of records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise RawCompletionsError(f"{source}: record {i} is {type(rec).__name__}, not an object")
        for key, typ in RAW_REQUIRED.items():
            if key not in rec:
                raise RawCompletionsError(f"{source}: record {i} has no field {key!r}")
            value = rec[key]
            if not isinstance(value, typ) or isinstance(value, bool):
                raise RawCompletionsError(
                    f"{source}: record {i} field {key!r} should be {typ.__name__}, "
                    f"got {type(value).__name__} {value!r:.60}"
                )
    return records


def read_raw_completions(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RawCompletionsError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    return validate_raw_completions(records, str(path))


def write_raw_completions(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    plain = validate_raw_completions([dict(r) for r in records], str(path))
    atomic_write_json(path, plain)


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions(names: Iterable[str] = PROVENANCE_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")  # only report CUDA if the run already uses torch
    if torch is not None and torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


STAGE_PACKAGES = ("torch", "transformers", "peft", "trl")


def stage_provenance(device: str | None, keyed_env: Mapping[str, str]) -> dict[str, Any]:
    """What computed one stage: code version, libraries, device and dtype, every ``EPS_*`` variable.

    ``device`` is the stage's requested device (None: the default). vLLM is
    listed only when this process imported it, i.e. when a stage used it.
    """
    packages = [*STAGE_PACKAGES, *(["vllm"] if "vllm" in sys.modules else [])]
    return {
        "git": git_state(),
        "packages": package_versions(packages),
        **_device_and_dtype(device),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("EPS_")},
        "keyed_env": dict(keyed_env),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _device_and_dtype(device: str | None) -> dict[str, Any]:
    if "torch" not in sys.modules:  # the stage never touched a model (judging, analysis)
        return {"device": None, "device_name": None, "dtype": None}
    from explore_persona_space.models import pick_device, pick_dtype

    dev = pick_device(device)
    torch = sys.modules["torch"]
    if dev.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(dev))
    else:
        name = platform.processor() or platform.machine()
    return {"device": dev, "device_name": name, "dtype": str(pick_dtype(dev)).removeprefix("torch.")}


def provenance() -> dict[str, Any]:
    return {
        "git": git_state(),
        "packages": package_versions(),
        "hardware": hardware(),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_run_result(
    path: Path,
    *,
    config: Any,
    seeds: Mapping[str, int],
    results: Mapping[str, Any],
    timings: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """run_result.json: resolved config, seeds, results, per-stage timings, provenance."""
    doc = {
        "config": config,
        "seeds": dict(seeds),
        "results": dict(results),
        "timings_s": {k: round(float(v), 3) for k, v in timings.items()},
        "provenance": provenance(),
        **(dict(extra) if extra else {}),
    }
    atomic_write_json(path, doc)
    return json.loads(to_json(doc))
