"""What a training run owns: its metrics log, and the identity of what its checkpoints continue.

Run directory. ``metrics.jsonl`` in a run's ``output_dir`` belongs to one run. A new run refuses
a directory whose log already holds records (choose another ``output_dir``); a resumed run
continues its own log. Either way the writer holds an exclusive ``flock`` on the file for its
lifetime, so two processes never write into one log at the same time.

Resume identity. A checkpoint records (JSON, next to DeepSpeed's files, and in DeepSpeed's
client state) the selection config, the per-step pool and batch sizes, and a fingerprint of
each pool split: the SHA-256 of its manifest entries (tokenizer fingerprint, domains, max length,
each shard's domain table and the SHA-256 of every array file the builder recorded). A resume
compares them before any weight is loaded and refuses any difference unless ``allow_changes``
is given; the error lists every difference. Keys that only change logging, evaluation or timeouts
(:data:`~ds_partitionsel.config.RESUME_FREE_KEYS`) may change freely; so may the world size (the
selection does not depend on it).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import List, Optional

from ds_partitionsel.config import config_differences

METRICS_LOG = "metrics.jsonl"
RESUME_RECORD = "partitionsel_resume.json"  # in the checkpoint's tag folder


class RunDirError(ValueError):
    """A run directory already belongs to another run, or another process is writing its log."""


class ResumeMismatchError(ValueError):
    """A checkpoint was trained on another pool or with another selection config."""


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or damaged (its resume record unreadable, ``latest``
    naming a missing tag)."""


def _taken(path) -> RunDirError:
    return RunDirError(f"{path} already holds the log of another run; a run directory is never shared: choose a "
                       f"new output directory (--output-dir), or resume that run from its checkpoint "
                       f"(--resume) to continue its log")


def check_run_dir(output_dir, resume: bool = False) -> None:
    """Refuse early (before anything is built) an ``output_dir`` whose log belongs to another run."""
    path = os.path.join(output_dir, METRICS_LOG)
    if not resume and os.path.isfile(path) and os.path.getsize(path) > 0:
        raise _taken(path)


def open_metrics_log(output_dir, resume: bool = False):
    """Open ``output_dir/metrics.jsonl`` for appending, owned by this run (see the module doc).

    A log that exists with records is refused unless ``resume``; an empty one (a run that
    stopped before its first step) is reused. Raises :class:`RunDirError`.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, METRICS_LOG)
    fh = open(path, "a", encoding="utf-8")
    try:
        _lock(fh, path)
        if not resume and os.fstat(fh.fileno()).st_size > 0:
            raise _taken(path)
    except BaseException:
        fh.close()
        raise
    return fh


def _lock(fh, path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no advisory locks
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirError(f"another process is writing {path} right now; runs never share an output "
                          f"directory: choose a new --output-dir") from None


def pool_fingerprint(pool) -> str:
    """SHA-256 over what determines a split's records: the manifest's domains, max length and
    tokenizer fingerprint, the split's record count, every array file's recorded SHA-256
    (with its place in the split entry) and every shard's domain table, so any pool layout is
    covered. Same pool files, same
    fingerprint; other records, or the same records in another order, another fingerprint."""
    manifest = pool.manifest
    entry = manifest["splits"][pool.split]
    hashes = {}

    def collect(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "sha256" and isinstance(value, str):
                    hashes[where] = value
                else:
                    collect(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                collect(value, f"{where}/{i}")

    collect(entry, pool.split)
    # each shard's own domain table maps its domain ids to names: a reordered table relabels
    # records without changing any file, so it is part of the identity
    shard_domains = [s.get("domains") for s in entry.get("shards", []) if isinstance(s, dict)]
    ident = {"domains": manifest.get("domains"), "max_length": manifest.get("max_length"),
             "tokenizer": (manifest.get("tokenizer") or {}).get("fingerprint_sha256"),
             "num_records": len(pool), "files": hashes, "shard_domains": shard_domains}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()


def resume_record(engine) -> dict:
    """What a checkpoint of ``engine`` (a PartitionSelEngine) must match to be resumed."""
    return {"global_step": engine.global_step, "run_id": getattr(engine, "run_id", None),
            "config": engine.cfg.to_dict(),
            "pool_size": engine.pool_size, "batch_size": engine.batch_size,
            "pool_fingerprint": {"train": pool_fingerprint(engine.pool),
                                 "valid": pool_fingerprint(engine.valid_pool)},
            "pool_records": len(engine.pool)}


def resume_differences(saved: dict, current: dict) -> List[str]:
    """Human-readable differences between a checkpoint's record and this run's (empty: same)."""
    out = config_differences(saved.get("config", {}), current["config"])
    for key in ("pool_size", "batch_size"):
        if key in saved and saved[key] != current[key]:
            out.append(f"{key}: {saved[key]} -> {current[key]}")
    fingerprints = saved.get("pool_fingerprint")
    if fingerprints is None:
        out.append(f"pool identity: not recorded by this (older) checkpoint, only its record count "
                   f"{saved.get('pool_records')} (this pool: {current['pool_records']})")
    else:
        for split, fp in current["pool_fingerprint"].items():
            if fingerprints.get(split) != fp:
                out.append(f"pool {split} split: fingerprint {str(fingerprints.get(split))[:12]} -> {fp[:12]} "
                           f"(another pool, or its records or their order changed)")
    return out


def write_resume_record(tag_dir, record: dict) -> None:
    """Write ``tag_dir/partitionsel_resume.json`` atomically (rank 0, after DeepSpeed saved)."""
    path = Path(tag_dir) / RESUME_RECORD
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_resume_record(load_dir, tag: Optional[str]) -> Optional[dict]:
    """The JSON record of checkpoint ``load_dir``/``tag`` (tag None: DeepSpeed's ``latest``), if any.

    Plain JSON: it is read and compared before DeepSpeed unpickles anything.
    """
    load_dir = Path(load_dir)
    if tag is None:
        latest = load_dir / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (load_dir / tag).is_dir():
            raise CheckpointError(f"{latest} names the checkpoint {tag!r}, which is not in {load_dir}: the "
                                  f"save did not finish or the folder was removed; pass an existing tag's folder "
                                  f"or restore it")
    path = load_dir / str(tag) / RESUME_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid resume record ({e}): the save was cut short; resume from "
                              f"an earlier checkpoint") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} is not a valid resume record (a JSON {type(record).__name__}, not an "
                              f"object); resume from an earlier checkpoint")
    return record


def check_resume(saved: dict, current: dict, where, allow_changes: bool) -> List[str]:
    """Raise :class:`ResumeMismatchError` listing the differences unless ``allow_changes``.

    Returns the differences (for the caller to log when they were allowed).
    """
    diffs = resume_differences(saved, current)
    if diffs and not allow_changes:
        raise ResumeMismatchError(
            f"checkpoint {where} does not match this run: {'; '.join(diffs)}. Resume with the same pool "
            f"and selection config, or allow the changes explicitly (load_checkpoint(..., "
            f"allow_changes=True); launch/train.py --resume-allow-changes)")
    return diffs


# ----------------------------------------------------------------------------- run identity

RUN_ID_FILE = "run_id"  # in output_dir: the id of the run whose log metrics.jsonl is


def new_run_id() -> str:
    """A fresh run id (random, 32 hex digits)."""
    import uuid

    return uuid.uuid4().hex


def read_run_id(output_dir) -> Optional[str]:
    """The run id of ``output_dir`` (None: none recorded, e.g. a new directory)."""
    path = Path(output_dir) / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def write_run_id(output_dir, run_id: str) -> None:
    """Record ``run_id`` as the owner of ``output_dir`` (atomically; rank 0)."""
    path = Path(output_dir) / RUN_ID_FILE
    tmp = path.with_name(f".{RUN_ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_run_owner(output_dir, saved_run_id: Optional[str], checkpoint) -> None:
    """Refuse to resume the run ``saved_run_id`` (from checkpoint ``checkpoint``) into an
    ``output_dir`` whose log belongs to another run: its records would join that run's log and
    its summary would replace that run's. A directory without a log (or without a recorded id:
    written before run ids existed) is accepted."""
    if not output_dir or not saved_run_id:
        return
    log = Path(output_dir) / METRICS_LOG
    owner = read_run_id(output_dir)
    if owner is not None and owner != saved_run_id and log.is_file() and log.stat().st_size > 0:
        raise RunDirError(f"--output-dir {output_dir} holds the log of run {owner}, but checkpoint {checkpoint} "
                          f"is of run {saved_run_id}: resume into that run's own --output-dir, or into a new one")
