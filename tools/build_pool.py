#!/usr/bin/env python
"""Build a candidate pool directory from jsonl files or local HF datasets with a domain field.

    python tools/build_pool.py --tokenizer .cache/models/smollm2-135m \\
        --train .cache/demo_data/train.jsonl --valid .cache/demo_data/valid.jsonl \\
        --max-length 512 --out .cache/pools/demo

    # the same, sharded over 3 MPI ranks (byte-identical output):
    mpiexec -n 3 --oversubscribe --mca btl self,sm -x OMP_NUM_THREADS=1 \\
        python tools/build_pool.py ... --out .cache/pools/demo

Every record needs a prompt, a response and a non-empty domain (field names configurable).
Records are tokenized with the tokenizer's chat template when it has one (else
``prompt + "\\n"`` then ``response + EOS``); prompt tokens are masked out of the loss; records
longer than ``--max-length`` are cut (counted per domain and reported). The format is described
in ``ds_partitionsel/pool_format.py``; the reader is ``ds_partitionsel.data.CandidatePool``.

Under ``mpiexec`` every rank tokenizes a contiguous share of the records and sends it to rank 0
(raw numpy buffers and JSON, no pickle), which writes the pool. The output does not depend on
the number of ranks. The pool is written to a temporary directory next to ``--out`` and renamed
into place at the end, so a failed build leaves nothing half-written, and an existing pool
replaced with ``--overwrite`` survives a failed build.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ds_partitionsel import pool_format as pf

EXIT_OK, EXIT_BUILD_ERROR = 0, 1


class BadRecord(ValueError):
    """One input record cannot be used; the message names the file and line (or row)."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.reason = reason


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One input: a jsonl file (units = lines) or a ``datasets.load_from_disk`` folder (units = rows)."""

    path: str
    kind: str
    num_units: int
    _dataset: object = field(default=None, repr=False)

    def where(self, unit: int) -> str:
        return f"{self.path}:{unit + 1}" if self.kind == "jsonl" else f"{self.path}[row {unit}]"

    def read(self, start: int, stop: int):
        """Yield ``(unit, raw)`` for units ``start <= unit < stop``; raw is bytes (jsonl) or a dict."""
        if self.kind == "jsonl":
            with open(self.path, "rb") as f:
                for unit, line in enumerate(f):
                    if unit >= stop:
                        break
                    if unit >= start:
                        yield unit, line
        else:
            rows = self._dataset.select(range(start, stop))
            for k, row in enumerate(rows):
                yield start + k, row


def open_source(path: str) -> Source:
    p = Path(path)
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise ValueError(f"{path} is a directory but not a dataset saved with save_to_disk: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{path} holds a DatasetDict with splits {list(ds)}; pass one split's folder, "
                             f"e.g. {p / list(ds)[0]}")
        return Source(path, "hf", len(ds), ds)
    if not p.is_file():
        raise ValueError(f"input {path!r} does not exist (expected a .jsonl file or a save_to_disk folder)")
    with open(p, "rb") as f:
        n = sum(1 for _ in f)
    return Source(path, "jsonl", n)


def source_fingerprint(src: Source) -> str:
    if src.kind == "jsonl":
        return pf.sha256_file(src.path)
    files = sorted(q for q in Path(src.path).rglob("*") if q.is_file())
    blob = "\n".join(f"{q.relative_to(src.path).as_posix()} {pf.sha256_file(q)}" for q in files)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Fields:
    prompt: str = "prompt"
    response: str = "response"
    domain: str = "domain"


def parse_record(raw, where: str, fields: Fields):
    """``(prompt, response, domain)`` of one raw unit, or ``None`` for a blank jsonl line.

    Raises :class:`BadRecord` for malformed JSON, a non-object, a missing or non-string field,
    an empty domain, or an empty response.
    """
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            return None
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecord(where, "malformed_json", f"malformed JSON ({e.msg} at column {e.colno})") from None
    else:
        rec = raw
    if not isinstance(rec, dict):
        raise BadRecord(where, "not_an_object", f"expected a JSON object, got {type(rec).__name__}")
    for name in (fields.prompt, fields.response, fields.domain):
        if name not in rec:
            raise BadRecord(where, f"missing_{name}",
                            f"missing field {name!r} (has {sorted(rec)}); set --{_flag(name, fields)}-field")
        if not isinstance(rec[name], str):
            raise BadRecord(where, f"bad_{name}", f"field {name!r} must be a string, got {type(rec[name]).__name__}")
    domain = rec[fields.domain].strip()
    if not domain:
        raise BadRecord(where, "empty_domain", f"empty domain in field {fields.domain!r}")
    if not rec[fields.response].strip():
        raise BadRecord(where, "empty_response", f"empty response in field {fields.response!r}")
    return rec[fields.prompt], rec[fields.response], domain


def _flag(name: str, fields: Fields) -> str:
    return {fields.prompt: "prompt", fields.response: "response", fields.domain: "domain"}[name]


# ----------------------------------------------------------------------------- one shard


@dataclass
class Shard:
    """The tokenized records of one contiguous range of units, in order."""

    tokens: list = field(default_factory=list)      # per record: np.ndarray of ids
    masks: list = field(default_factory=list)       # per record: np.ndarray of bool
    domains: list = field(default_factory=list)     # per record: domain name
    truncated: list = field(default_factory=list)   # per record: bool
    errors: list = field(default_factory=list)      # [global unit, reason, message]
    dropped_no_response: int = 0                    # truncation left no response token


def tokenize_shard(sources, start: int, stop: int, tokenizer, use_chat: bool, max_length: int,
                   fields: Fields, skip_bad: bool, progress) -> Shard:
    """Tokenize global units ``start <= g < stop`` over the concatenation of ``sources``.

    Without ``skip_bad`` it stops at the first bad record (recorded in ``shard.errors``).
    """
    shard = Shard()
    base = 0
    for src in sources:
        lo, hi = max(start - base, 0), min(stop - base, src.num_units)
        if lo < hi:
            for unit, raw in src.read(lo, hi):
                progress.update(1)
                try:
                    parsed = parse_record(raw, src.where(unit), fields)
                except BadRecord as e:
                    shard.errors.append([base + unit, e.reason, str(e)])
                    if not skip_bad:
                        return shard
                    continue
                if parsed is None:
                    continue
                prompt, response, domain = parsed
                ids, mask = pf.tokenize_example(tokenizer, prompt, response, use_chat)
                cut = len(ids) > max_length
                ids, mask = ids[:max_length], mask[:max_length]
                if not any(mask):
                    shard.dropped_no_response += 1
                    continue
                shard.tokens.append(np.asarray(ids, dtype=np.int64))
                shard.masks.append(np.asarray(mask, dtype=np.bool_))
                shard.domains.append(domain)
                shard.truncated.append(cut)
        base += src.num_units
    return shard


def shard_payload(shard: Shard, dtype: np.dtype):
    """Flatten a shard into (json header, tokens, loss mask as uint8, lengths, truncated as uint8)."""
    lengths = np.asarray([len(t) for t in shard.tokens], dtype=np.int64)
    tokens = np.concatenate(shard.tokens).astype(dtype) if shard.tokens else np.zeros(0, dtype)
    mask = np.concatenate(shard.masks).astype(np.uint8) if shard.masks else np.zeros(0, np.uint8)
    meta = {"domains": shard.domains, "errors": shard.errors, "dropped_no_response": shard.dropped_no_response}
    header = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    return header, tokens, mask, lengths, np.asarray(shard.truncated, dtype=np.uint8)


def _wait(request, poll_s: float = 0.005) -> None:
    """Wait for a nonblocking MPI request, sleeping between polls.

    A blocking MPI call spins at full CPU while it waits; with more ranks than cores (e.g.
    ``-n 3 --oversubscribe`` on 2 cores) the waiting ranks would steal the CPU from the ones
    still tokenizing.
    """
    while not request.Test():
        time.sleep(poll_s)


def gather_payloads(comm, payload, dtype):
    """Rank 0 receives every rank's payload in rank order (MPI buffer messages; no pickle)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    header, tokens, mask, lengths, truncated = payload
    if rank != 0:
        sizes = np.asarray([header.size, tokens.size, lengths.size], dtype=np.int64)
        _wait(comm.Isend(sizes, dest=0, tag=10))
        for k, arr in enumerate((header, tokens, mask, lengths, truncated)):
            _wait(comm.Isend(np.ascontiguousarray(arr), dest=0, tag=11 + k))
        return None
    out = [payload]
    for r in range(1, size):
        sizes = np.zeros(3, dtype=np.int64)
        _wait(comm.Irecv(sizes, source=r, tag=10))
        n_json, n_tok, n_rec = (int(x) for x in sizes)
        parts = [np.empty(n_json, np.uint8), np.empty(n_tok, dtype), np.empty(n_tok, np.uint8),
                 np.empty(n_rec, np.int64), np.empty(n_rec, np.uint8)]
        for k, arr in enumerate(parts):
            _wait(comm.Irecv(arr, source=r, tag=11 + k))
        out.append(tuple(parts))
    return out


# ----------------------------------------------------------------------------- writing (rank 0)


def merge_split(payloads):
    """Concatenate the per-rank payloads of one split in rank order."""
    metas = [json.loads(p[0].tobytes().decode("utf-8")) for p in payloads]
    return {
        "tokens": np.concatenate([p[1] for p in payloads]),
        "loss_mask": np.concatenate([p[2] for p in payloads]).astype(np.bool_),
        "lengths": np.concatenate([p[3] for p in payloads]),
        "truncated": np.concatenate([p[4] for p in payloads]).astype(np.bool_),
        "domains": [d for m in metas for d in m["domains"]],
        "errors": sorted((e for m in metas for e in m["errors"]), key=lambda e: e[0]),
        "dropped_no_response": sum(m["dropped_no_response"] for m in metas),
    }


def write_split(split_dir: Path, merged: dict, domain_ids: dict) -> dict:
    """Write one split's arrays; returns its manifest entry (without sources)."""
    split_dir.mkdir()
    domains = np.asarray([domain_ids[d] for d in merged["domains"]], dtype=np.int32)
    offsets = np.zeros(len(domains) + 1, dtype=np.int64)
    np.cumsum(merged["lengths"], out=offsets[1:])
    arrays = {"tokens.npy": merged["tokens"], "loss_mask.npy": merged["loss_mask"], "offsets.npy": offsets,
              "domains.npy": domains, "truncated.npy": merged["truncated"]}
    files = {name: pf.save_array(split_dir / name, arr) for name, arr in arrays.items()}
    loss_per_record = np.add.reduceat(merged["loss_mask"].astype(np.int64), offsets[:-1]) if len(domains) else \
        np.zeros(0, np.int64)
    per_domain = {}
    for name, d in sorted(domain_ids.items(), key=lambda kv: kv[1]):
        sel = domains == d
        if sel.any():
            per_domain[name] = {"records": int(sel.sum()), "tokens": int(merged["lengths"][sel].sum()),
                                "loss_tokens": int(loss_per_record[sel].sum()),
                                "truncated": int(merged["truncated"][sel].sum())}
    return {"num_records": int(len(domains)), "num_tokens": int(offsets[-1]),
            "num_loss_tokens": int(merged["loss_mask"].sum()), "per_domain": per_domain, "files": files}


def skipped_counts(errors) -> dict:
    counts = {}
    for _, reason, _ in errors:
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def commit_pool(staging: Path, out: Path) -> None:
    """Move a finished pool into place; an existing ``out`` is kept until the new one is there."""
    if out.exists():
        backup = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rmdir(backup)
        os.rename(out, backup)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(backup, out)
            raise
        shutil.rmtree(backup)
    else:
        os.rename(staging, out)


# ----------------------------------------------------------------------------- driver


def get_comm():
    """The MPI world communicator when started by an MPI launcher, else ``None`` (one process)."""
    launched = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"))
    if not launched:
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _all_ok(comm, ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank."""
    if comm is None:
        return ok
    from mpi4py import MPI

    out = np.zeros(1, np.int64)
    flag = np.asarray([0 if ok else 1], np.int64)
    _wait(comm.Iallreduce(flag, out, op=MPI.SUM))
    return int(out[0]) == 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tokenizer", required=True, help="local folder of a Hugging Face tokenizer (or model)")
    p.add_argument("--train", nargs="+", required=True, metavar="PATH", help="jsonl files / save_to_disk folders")
    p.add_argument("--valid", nargs="+", default=[], metavar="PATH", help="held-out split inputs")
    p.add_argument("--out", required=True, type=Path, help="pool directory to create")
    p.add_argument("--max-length", type=int, default=1024, help="cut records to this many tokens (default 1024)")
    p.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto",
                   help="use the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--domains", default=None,
                   help="comma-separated domain names fixing the id order (default: sorted names found)")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--domain-field", default="domain")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = p.parse_args(argv)
    if args.max_length < 2:
        p.error(f"--max-length must be at least 2, got {args.max_length}")
    return args


def build(args, comm) -> int:
    from tqdm import tqdm

    rank = 0 if comm is None else comm.Get_rank()
    size = 1 if comm is None else comm.Get_size()
    clock = {"start": time.perf_counter()}
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    fail = lambda msg: print(f"error: {msg}" if size == 1 else f"error (rank {rank}): {msg}",  # noqa: E731
                             file=sys.stderr, flush=True)

    # 1. validate everything that can be checked before tokenizing, on every rank
    out = args.out.resolve()
    err = None
    if rank == 0 and out.exists() and not args.overwrite:
        err = f"output {args.out} already exists; pass --overwrite to replace it (the old pool is kept if the build fails)"
    elif rank == 0 and not out.parent.is_dir():
        err = f"parent directory of --out ({out.parent}) does not exist"
    try:
        tokenizer = pf.load_tokenizer(args.tokenizer)
        splits = {"train": [open_source(s) for s in args.train]}
        if args.valid:
            splits["valid"] = [open_source(s) for s in args.valid]
    except ValueError as e:
        err = err or str(e)
    use_chat = False
    if err is None:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if args.chat_template == "on" and not has_template:
            err = f"--chat-template on, but tokenizer {args.tokenizer} has no chat template"
        use_chat = has_template if args.chat_template == "auto" else args.chat_template == "on"
    if err:
        fail(err)
    if not _all_ok(comm, err is None):
        return EXIT_BUILD_ERROR
    fields = Fields(args.prompt_field, args.response_field, args.domain_field)
    info = pf.tokenizer_info(tokenizer, args.tokenizer)
    clock["setup"] = time.perf_counter()
    dtype = pf.token_dtype(info["vocab_size"])

    # 2. every rank tokenizes its contiguous share of each split; rank 0 gathers in rank order
    gathered = {}
    for split, sources in splits.items():
        t0 = time.perf_counter()
        n = sum(s.num_units for s in sources)
        start, stop = n * rank // size, n * (rank + 1) // size
        desc = split if size == 1 else f"{split} (rank 0 of {size})"
        with tqdm(total=stop - start, desc=desc, unit="rec", disable=args.quiet or rank != 0,
                  file=sys.stderr) as bar:
            shard = tokenize_shard(sources, start, stop, tokenizer, use_chat, args.max_length, fields,
                                   args.skip_bad, bar)
        payload = shard_payload(shard, dtype)
        clock["tokenize"] = clock.get("tokenize", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        gathered[split] = [payload] if comm is None else gather_payloads(comm, payload, dtype)
        clock["gather"] = clock.get("gather", 0.0) + time.perf_counter() - t0

    # 3. rank 0 validates the whole, writes a staging dir, and renames it into place
    err = None
    if rank == 0:
        try:
            t0 = time.perf_counter()
            err = write_pool(args, out, gathered, splits, info, use_chat, say)
            if not args.quiet and err is None:
                say(f"time (rank 0): setup {clock['setup'] - clock['start']:.2f} s, tokenize {clock['tokenize']:.2f} s, "
                    f"gather {clock['gather']:.2f} s, write {time.perf_counter() - t0:.2f} s; {size} worker(s)")
        except Exception as e:  # report, and let every rank exit with the same status
            err = f"{type(e).__name__}: {e}"
        if err:
            fail(err)
    ok = _all_ok(comm, err is None)
    return EXIT_OK if ok else EXIT_BUILD_ERROR


def write_pool(args, out: Path, gathered: dict, splits: dict, info: dict, use_chat: bool, say):
    """Rank 0: merge, check, write and commit the pool. Returns an error message or None."""
    merged = {split: merge_split(payloads) for split, payloads in gathered.items()}
    for split, m in merged.items():
        if m["errors"] and not args.skip_bad:
            first = m["errors"][0][2]
            return f"bad record: {first}\n(fix the input, or pass --skip-bad to skip and count bad records)"
    found = sorted({d for m in merged.values() for d in m["domains"]})
    if args.domains:
        names = [d.strip() for d in args.domains.split(",") if d.strip()]
        if len(set(names)) != len(names):
            return f"--domains lists a name twice: {names}"
        unknown = [d for d in found if d not in names]
        if unknown:
            return f"records have domains {unknown} that --domains {args.domains!r} does not list"
    else:
        names = found
    for split, m in merged.items():
        if not m["domains"]:
            return f"split {split!r} has no usable records (inputs: {[s.path for s in splits[split]]})"
    domain_ids = {d: i for i, d in enumerate(names)}

    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        manifest = {
            "format": pf.FORMAT_NAME, "format_version": pf.FORMAT_VERSION,
            "tokenizer": info, "max_length": args.max_length,
            "template": "chat" if use_chat else "plain",
            "fields": {"prompt": args.prompt_field, "response": args.response_field, "domain": args.domain_field},
            "domains": names, "splits": {},
        }
        for split, m in merged.items():
            entry = write_split(staging / split, m, domain_ids)
            entry["sources"] = [{"path": s.path, "kind": s.kind, "sha256": source_fingerprint(s)}
                                for s in splits[split]]
            entry["skipped_bad"] = skipped_counts(m["errors"])
            entry["dropped_no_response_after_truncation"] = m["dropped_no_response"]
            manifest["splits"][split] = entry
        with open(staging / pf.MANIFEST, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        commit_pool(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not args.quiet:
        say(summary(manifest, merged))
        say(f"wrote {out}")
    return None


def summary(manifest: dict, merged: dict) -> str:
    lines = [f"tokenizer {manifest['tokenizer']['name_or_path']}  template={manifest['template']}  "
             f"max_length={manifest['max_length']}"]
    lines.append(f"{'split':6s} {'domain':12s} {'records':>8s} {'tokens':>10s} {'truncated':>9s}")
    for split, entry in manifest["splits"].items():
        for d, c in entry["per_domain"].items():
            lines.append(f"{split:6s} {d:12s} {c['records']:8d} {c['tokens']:10d} {c['truncated']:9d}")
        extra = []
        if entry["skipped_bad"]:
            extra.append(f"skipped bad records {entry['skipped_bad']}")
            for e in merged[split]["errors"][:5]:
                extra.append(f"  {e[2]}")
        if entry["dropped_no_response_after_truncation"]:
            extra.append(f"dropped {entry['dropped_no_response_after_truncation']} records with no response "
                         f"token left after truncation to {manifest['max_length']}")
        lines += [f"{split:6s} {x}" for x in extra]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return build(args, get_comm())


if __name__ == "__main__":
    sys.exit(main())
