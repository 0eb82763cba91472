"""Read an offline wandb run back from its ``run-<id>.wandb`` file, without a server.

wandb 0.31 writes runs from its Go core and ships no Python reader (the old
``wandb/sdk/internal/datastore.py`` is gone; ``wandb sync`` only uploads). The file is
wandb's transaction log: a 7-byte header (``:W&B``, magic ``0xBEE1``, version 0), then
LevelDB-log records in 32 KiB blocks - each a CRC-32 of type byte + data, a 2-byte
length and a type (full / first / middle / last chunk) - whose payloads are wandb's
own ``Record`` protobuf messages (``wandb.proto.wandb_internal_pb2``). This module
decodes them into what the run would show: config, summary, history, artifacts.

    uv run python -m explore_persona_space.tracking_offline eval_results/issue247/wandb/offline-run-*
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
CHUNK_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class TransactionLogError(ValueError):
    """A ``.wandb`` file that is not a wandb transaction log, or is corrupt."""


def records(path: Path) -> Iterator[Any]:
    """The ``Record`` messages of a ``.wandb`` file, in order; a torn tail (killed writer) ends the scan."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if not data.startswith(HEADER):
        raise TransactionLogError(f"{path}: not a wandb transaction log (header {data[:7]!r})")
    pos, pending = len(HEADER), b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if crc == length == kind == 0:  # zeros to the end of the block
            pos += left
            continue
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return
        pos += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@dataclass
class OfflineRun:
    """What an offline run logged, as the web UI would show it after ``wandb sync``."""

    path: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    started: float = 0.0  # seconds since the epoch, as the run record says
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    def series(self, key: str) -> list[Any]:
        """One history key's values, in logging order."""
        return [row[key] for row in self.history if key in row]


def _items(items: Sequence[Any]) -> dict[str, Any]:
    """Key/value updates as a dict; a nested key (``["figures/fig1", "path"]``) as nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def read_run(run_dir: Path, wait: float = 0.0) -> OfflineRun:
    """Decode ``<run_dir>/run-<id>.wandb`` (a run directory as ``wandb.init`` left it).

    wandb's core writes the log on its own schedule: right after ``run.finish()`` returns,
    the file may still end mid-record. ``wait`` polls for up to that many seconds until
    the run's exit record is there; a killed run has none and is returned as far as it got.
    """
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if len(files) != 1:
        raise TransactionLogError(f"{run_dir}: expected one run-*.wandb file, found {len(files)}")
    deadline = time.monotonic() + wait
    while True:
        run = _decode(Path(run_dir), files[0])
        if run.exit_code is not None or time.monotonic() >= deadline:
            return run
        time.sleep(0.2)


def _decode(run_dir: Path, log_file: Path) -> OfflineRun:
    run = OfflineRun(run_dir)
    for rec in records(log_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.project, run.name = r.run_id, r.project, r.display_name
            run.group, run.job_type = r.run_group, r.job_type
            run.started = r.start_time.seconds + r.start_time.nanos / 1e9
            run.config.update(_items(r.config.update))
        elif kind == "config":
            run.config.update(_items(rec.config.update))
        elif kind == "summary":
            _merge(run.summary, _items(rec.summary.update))
        elif kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "artifact":
            a = rec.artifact
            entries = {e.path: e.local_path for e in a.manifest.contents}
            run.artifacts.append({"name": a.name, "type": a.type, "digest": a.digest, "files": entries})
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m explore_persona_space.tracking_offline", description=__doc__
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="offline-run-* directories")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        run = read_run(run_dir)
        head = f"{run.run_id} {run.name!r} group={run.group} job_type={run.job_type} exit={run.exit_code}"
        sys.stdout.write(f"{run_dir}\n  {head}\n  config: {', '.join(sorted(run.config))}\n")
        sys.stdout.write(
            f"  history: {len(run.history)} rows; artifacts: "
            f"{', '.join(a['name'] for a in run.artifacts) or 'none'}\n"
        )
        for key, value in sorted(run.summary.items()):
            if not key.startswith("_"):
                sys.stdout.write(f"  {key} = {json.dumps(value)[:120]}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
