"""Build a candidate pool: the library behind ``tools/build_pool.py`` (its command line).

Inputs (:func:`open_source`, :func:`open_megatron`) are read as a stream of units (jsonl lines,
HF dataset rows, Megatron documents) in shards of ``shard_docs`` units; :func:`build_shard` turns
one shard into one :class:`~ds_partitionsel.pool_format.ShardBuffer` per output split (fine-tuning
records, documents, or packed windows) and writes its files; :func:`build` runs the shards over
the MPI ranks (rank r builds shards r, r + n, ...) and rank 0 writes the manifest and commits the
pool (:func:`write_manifest`). docs/POOLS.md describes the format and the guarantees.
"""
from __future__ import annotations

import codecs
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import pool_format as pf

EXIT_OK, EXIT_BUILD_ERROR = 0, 1
LINE_INDEX_STRIDE = 1024  # a jsonl source remembers the byte offset of every 1024th line
TEXT_BATCH_CHARS = 1 << 20  # texts handed to the tokenizer per batch call (about 1 MB)
# A longer text is tokenized in pieces of about this many characters (256K), cut where the tokenizer
# itself has a token boundary (:func:`text_pieces`): its memory is that of one piece.
LONG_TEXT_CHARS = 1 << 18
CUT_CHECK_CHARS = 256  # context on each side of a cut when checking it is a token boundary
MEGATRON_EXTRA = "pip install 'ds_partitionsel[megatron]'"


class BadRecord(ValueError):
    """One input record cannot be used; the message names the file and line (or row)."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.reason = reason


class BuildError(ValueError):
    """The input cannot make a pool (not a single record's fault); never skipped by --skip-bad."""


# ----------------------------------------------------------------------------- sources


def _index_lines(path: str):
    """One pass over a file: SHA-256, number of lines, byte offset of every LINE_INDEX_STRIDE-th line."""
    h = hashlib.sha256()
    marks, n_lines, pos, last = [0], 0, 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
            ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)  # positions of "\n"
            # line k >= 1 starts after newline number k - 1; keep the starts of lines STRIDE, 2*STRIDE, ...
            first = (-n_lines - 1) % LINE_INDEX_STRIDE
            marks.extend((pos + ends[first::LINE_INDEX_STRIDE] + 1).tolist())
            n_lines += len(ends)
            pos += len(chunk)
            last = chunk[-1:]
    if pos and last != b"\n":
        n_lines += 1  # a last line without its newline
    return h.hexdigest(), n_lines, np.asarray(marks, dtype=np.int64)


@dataclass
class Source:
    """One input: a jsonl file (units = lines), a local HF dataset (rows) or a Megatron indexed
    dataset (documents, all of ``domain``)."""

    path: str
    kind: str
    num_units: int
    sha256: str
    domain: str | None = None
    _data: object = field(default=None, repr=False)

    def where(self, unit: int) -> str:
        if self.kind == "jsonl":
            return f"{self.path}:{unit + 1}"
        if self.kind == "megatron":
            return f"{self.path} (document {unit})"
        return f"{self.path}[row {unit}]"

    def read(self, start: int, stop: int):
        """Yield ``(unit, raw)`` for units ``start <= unit < stop``: raw is bytes (jsonl), a dict
        (HF row) or a 1-D integer array (Megatron document)."""
        if self.kind == "jsonl":
            block = start // LINE_INDEX_STRIDE
            with open(self.path, "rb") as f:
                f.seek(int(self._data[block]))
                unit = block * LINE_INDEX_STRIDE
                for line in f:
                    if unit >= stop:
                        break
                    if unit >= start:
                        # a UTF-8 byte-order mark starts some files (Windows editors): not part of the record
                        yield unit, (line[len(codecs.BOM_UTF8):] if unit == 0 and line.startswith(codecs.BOM_UTF8)
                                     else line)
                    unit += 1
        elif self.kind == "megatron":
            ds = self._data
            doc = ds.document_indices
            first, last = int(doc[start]), int(doc[stop])
            seqs = ds[first:last] if last > first else []
            for d in range(start, stop):
                parts = seqs[int(doc[d]) - first:int(doc[d + 1]) - first]
                yield d, (parts[0] if len(parts) == 1 else np.concatenate([np.zeros(0, ds.index.dtype), *parts]))
        else:
            rows, unit = iter(self._data.select(range(start, stop))), start
            while True:
                try:
                    row = next(rows)
                except StopIteration:
                    return
                except UnicodeDecodeError as e:  # Arrow strings are UTF-8 by definition; this file breaks that
                    raise BuildError(f"{self.where(unit)} (or a row just after it): a string that is not valid UTF-8 "
                                     f"({e.reason}); re-encode the dataset as UTF-8 (--encoding and "
                                     f"--encoding-errors apply to jsonl files only)") from None
                yield unit, row
                unit += 1

    def files(self) -> list:
        """The files this source reads (for the --out safety check)."""
        if self.kind == "megatron":
            return [self.path + ".idx", self.path + ".bin"]
        return [self.path]


def open_source(path: str) -> Source:
    """A jsonl file, or through ``datasets``: a save_to_disk folder, a .parquet, .arrow or .json file."""
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
        files = sorted(q for q in p.rglob("*") if q.is_file())
        blob = "\n".join(f"{q.relative_to(p).as_posix()} {pf.sha256_file(q)}" for q in files)
        return Source(path, "hf", len(ds), hashlib.sha256(blob.encode()).hexdigest(), _data=ds)
    if not p.is_file():
        raise ValueError(f"input {path!r} does not exist (expected a .jsonl, .json, .parquet or .arrow file "
                         f"or a save_to_disk folder)")
    check_not_compressed(p)
    suffix = p.suffix.lower()
    if suffix == ".arrow":
        check_arrow_stream(p)
    if suffix in (".parquet", ".arrow", ".json"):
        import datasets

        try:
            if suffix == ".arrow":
                ds = datasets.Dataset.from_file(str(p))
            else:
                ds = datasets.load_dataset(suffix[1:], data_files=str(p), split="train")
        except Exception as e:
            raise ValueError(f"could not read {path} as a {suffix[1:]} dataset: {type(e).__name__}: {e}") from e
        return Source(path, "hf", len(ds), pf.sha256_file(p), _data=ds)
    digest, n, marks = _index_lines(path)
    return Source(path, "jsonl", n, digest, _data=marks)


# the first bytes of compressed files: (magic, format, how to decompress)
COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"BZh", "bzip2", "bunzip2 -k"),
              (b"\xfd7zXZ\x00", "xz", "unxz -k"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"))


def check_not_compressed(path: Path) -> None:
    """Compressed input is not read; ``ValueError`` saying so (before it is taken for bad text)."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, name, tool in COMPRESSED:
        if head.startswith(magic):
            raise ValueError(f"input {path} is {name}-compressed; inputs are read uncompressed: decompress it "
                             f"first ({tool} {path}) and pass the decompressed file")


ARROW_FILE_MAGIC = b"ARROW1"  # the Arrow IPC *file* (random access) format; the stream format has none


def check_arrow_stream(path: Path) -> None:
    """``.arrow`` inputs are read as ``datasets`` writes them: the Arrow IPC *stream* format."""
    with open(path, "rb") as f:
        head = f.read(len(ARROW_FILE_MAGIC))
    if head == ARROW_FILE_MAGIC:
        raise ValueError(
            f"{path} is in the Arrow IPC file (random access) format; only the Arrow IPC stream format (what "
            f"datasets' save_to_disk writes) is read: convert it, e.g. with pyarrow: t = "
            f"pyarrow.ipc.open_file(SRC).read_all(); pyarrow.parquet.write_table(t, DST.parquet), and pass the "
            f".parquet file")


def input_warnings(plan) -> list:
    """Build inputs that are probably a mistake but not an error: the same content given twice
    (compared by SHA-256: ``--valid`` equal to ``--train``, or one file listed twice), and no
    validation split at all."""
    warnings_, seen = [], {}
    for grp in plan.groups:
        for src in grp["sources"]:
            role = "--valid" if grp["splits"] == ["valid"] else "--train"
            key = (src.sha256, src.kind)
            if key in seen:
                first = seen[key]
                what = ("its records would be both trained on and held out" if first[0] != role
                        else "its records would be counted twice")
                warnings_.append(f"{role} {src.path} has the same content (SHA-256 {src.sha256[:12]}) as "
                                 f"{first[0]} {first[1]}: {what}")
            else:
                seen[key] = (role, src.path)
    if not any("valid" in grp["splits"] for grp in plan.groups):
        warnings_.append("no validation split (neither --valid nor --valid-fraction): training needs held-out "
                         "records (selection anchors, held-out loss) and will refuse this pool; add --valid "
                         "FILES or --valid-fraction F")
    return warnings_


def describe_failure(e: BaseException, where: str, folder=None) -> str:
    """One line for an unexpected exception while building; a full disk is called one.

    numpy reports a short write to a full disk as ``OSError("N requested and M written")``
    without an errno, so that message counts as a full disk too; ``folder`` (where the pool is
    written) adds the free space of its file system.
    """
    short_write = re.search(r"\d+ requested and \d+ written", str(e))
    if isinstance(e, OSError) and (e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or short_write):
        try:
            free = f", {shutil.disk_usage(folder).free} bytes free on the file system of {folder}" if folder else ""
        except OSError:
            free = ""
        return (f"{where}: the disk is full ({e.strerror or e}{free}); free space on it or build to another file "
                f"system (--out); nothing was written")
    return f"{where}: {type(e).__name__}: {e}"


def _indexed_dataset_module():
    from ds_partitionsel.extras import require

    try:
        with warnings.catch_warnings():  # megatron-core warns about optional GPU packages on import
            warnings.simplefilter("ignore")
            return require("megatron.core.datasets.indexed_dataset", "--megatron (Megatron indexed datasets)")
    except ImportError as e:
        raise ValueError(str(e)) from e


def open_megatron(spec: str, vocab_size: int) -> Source:
    """``DOMAIN=PATH_PREFIX`` -> a Source over the documents of ``PREFIX.bin``/``PREFIX.idx``.

    The token dtype must be the one Megatron's preprocessing picks for ``vocab_size``
    (``DType.optimal_dtype``): another dtype means another tokenizer. Token ids are checked
    against ``vocab_size`` while reading.
    """
    domain, eq, prefix = spec.partition("=")
    domain = domain.strip()
    if not eq or not domain or not prefix:
        raise ValueError(f"--megatron expects DOMAIN=PATH_PREFIX, got {spec!r}")
    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            hint = (" (pass the prefix without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else "")
            raise ValueError(f"--megatron {spec}: {prefix}{ext} not found; a Megatron indexed dataset is "
                             f"PREFIX.idx plus PREFIX.bin{hint}")
    module = _indexed_dataset_module()
    try:
        ds = module.IndexedDataset(prefix)
    except Exception as e:
        raise ValueError(f"--megatron {spec}: megatron-core cannot read {prefix}.idx: {type(e).__name__}: {e}") from e
    want = np.dtype(module.DType.optimal_dtype(vocab_size))
    if np.dtype(ds.index.dtype) != want:
        raise ValueError(
            f"--megatron {spec}: {prefix} stores {np.dtype(ds.index.dtype).name} token ids, but Megatron stores "
            f"a vocabulary of {vocab_size} tokens (this tokenizer) as {want.name}: the dataset was built with "
            f"another tokenizer. Pass the tokenizer it was built with, or rebuild it with this one.")
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(pf.sha256_file(prefix + ".idx")))
    digest.update(str(os.path.getsize(prefix + ".bin")).encode())  # .bin: size only (Megatron scale)
    return Source(prefix, "megatron", len(ds.document_indices) - 1, digest.hexdigest(), domain=domain, _data=ds)


@dataclass(frozen=True)
class Fields:
    prompt: str = "prompt"
    response: str = "response"
    domain: str = "domain"
    text: str | None = None  # set: pretraining text records (text, domain)


def check_encoding(encoding: str) -> str:
    """The codec's canonical name, or ``ValueError``: a jsonl file is split into lines at the byte
    ``\\n``, so only encodings that write ASCII as single ASCII bytes (utf-8, latin-1, cp1252, ...) work."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"--encoding {encoding!r} is not a text encoding Python knows "
                         f"(e.g. utf-8, latin-1, cp1252)") from None
    try:
        ascii_compatible = '\n{"a": 1}'.encode(name) == b'\n{"a": 1}'
    except Exception:  # noqa: BLE001 - a codec that cannot even encode this is not ASCII-compatible
        ascii_compatible = False
    if not ascii_compatible:
        raise ValueError(f"--encoding {encoding!r} does not write ASCII as single bytes, so jsonl lines cannot be "
                         f"split at newline bytes; convert the file to UTF-8 first (e.g. iconv -f {encoding} -t utf-8)")
    return name


def decode_line(raw: bytes, where: str, encoding: str = "utf-8", errors: str = "strict") -> tuple[str, bool]:
    """One jsonl line's bytes -> ``(text, replaced)``; ``replaced`` is True when undecodable bytes
    were replaced by U+FFFD (only with ``errors="replace"``).

    Raises :class:`BadRecord` (reason ``undecodable``) naming the line, the byte column and the
    byte when the line is not valid ``encoding`` and ``errors`` is ``"strict"``.
    """
    try:
        return raw.decode(encoding), False
    except UnicodeDecodeError as e:
        if errors == "replace":
            return raw.decode(encoding, errors="replace"), True
        byte = raw[e.start:e.start + 1].hex()
        raise BadRecord(where, "undecodable",
                        f"bytes that are not valid {encoding} (byte 0x{byte} at byte column {e.start + 1}: "
                        f"{e.reason}); fix the file, pass --encoding if it uses another encoding, or "
                        f"--encoding-errors replace to replace such bytes by U+FFFD") from None


def parse_record(raw, where: str, fields: Fields):
    """One raw unit -> ``(prompt, response, domain)`` (fine-tuning) or ``(text, domain)``
    (pretraining, ``fields.text`` set); ``None`` for a blank jsonl line.

    ``raw`` is a jsonl line (``str``, or ``bytes`` decoded as strict UTF-8 by :func:`decode_line`)
    or an HF row (``dict``). Raises :class:`BadRecord` for undecodable bytes, malformed JSON, a
    non-object, a missing or non-string field, an empty domain, or an empty response / document.
    """
    if isinstance(raw, bytes):
        raw = decode_line(raw, where)[0]
    if isinstance(raw, str):
        text = raw.strip()
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
    names = (fields.text, fields.domain) if fields.text else (fields.prompt, fields.response, fields.domain)
    for name in names:
        if name not in rec or rec[name] is None:
            raise BadRecord(where, f"missing_{_flag(name, fields)}",
                            f"missing field {name!r} (has {sorted(rec)}); set --{_flag(name, fields)}-field")
        if not isinstance(rec[name], str):
            raise BadRecord(where, f"bad_{_flag(name, fields)}",
                            f"field {name!r} must be a string, got {type(rec[name]).__name__}")
    domain = rec[fields.domain].strip()
    if not domain:
        raise BadRecord(where, "empty_domain", f"empty domain in field {fields.domain!r}")
    if fields.text:
        if not rec[fields.text].strip():
            raise BadRecord(where, "empty_text", f"empty document in field {fields.text!r}")
        return rec[fields.text], domain
    if not rec[fields.response].strip():
        raise BadRecord(where, "empty_response", f"empty response in field {fields.response!r}")
    return rec[fields.prompt], rec[fields.response], domain


def _flag(name: str, fields: Fields) -> str:
    return {fields.prompt: "prompt", fields.response: "response", fields.domain: "domain",
            fields.text: "text"}[name]


def _cut_candidates(text: str, target: int, lo: int):
    """Positions ``lo < p <= target`` to try as cuts, nearest first: after a newline that
    precedes a non-space, then before a space that precedes a non-space (pre-token starts in
    byte-level BPE tokenizers), then any position (the check decides)."""
    for pattern in ("\n", " "):
        p = target
        while True:
            p = text.rfind(pattern, lo + 1, p)
            if p < 0:
                break
            cut = p + 1 if pattern == "\n" else p
            if lo < cut <= target and cut < len(text) and not text[cut].isspace() \
                    and (pattern == "\n" or not text[p - 1].isspace()):
                yield cut
    yield from range(target, lo, -max(1, (target - lo) // 64))


def text_pieces(text: str, encode, limit: int = LONG_TEXT_CHARS, attempts: int = 64) -> list:
    """``text`` as consecutive pieces of at most about ``limit`` characters whose token ids,
    concatenated, are the ids of the whole text.

    A cut at ``p`` is taken only when the tokenizer has a token boundary there: the ids of
    ``CUT_CHECK_CHARS`` characters on each side, encoded together, equal the two sides encoded
    apart. Tokenizers whose pre-tokenizer splits on local patterns (the byte-level BPE and
    Metaspace families) decide a boundary from its neighbourhood, so the local check is the
    whole-text property. Where no candidate of a stretch passes (``attempts`` checks), the
    stretch is not cut. ``encode(list of texts) -> list of id lists``.
    """
    if len(text) <= limit:
        return [text]
    pieces, start, w = [], 0, CUT_CHECK_CHARS
    while len(text) - start > limit:
        cut = None
        for i, p in enumerate(_cut_candidates(text, start + limit, start + limit // 2)):
            if i >= attempts:
                break
            both, left, right = encode([text[p - w:p + w], text[p - w:p], text[p:p + w]])
            if list(both) == list(left) + list(right):
                cut = p
                break
        if cut is None:
            break  # no checked boundary here: the rest stays whole
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def held_out(content: bytes, fraction: float) -> bool:
    """Deterministic per-document validation draw: the first 8 bytes of BLAKE2b(content), as a
    number in [0, 1), fall below ``fraction``. Identical documents go to the same split."""
    if fraction <= 0:
        return False
    return int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "little") < fraction * 2.0 ** 64


# ----------------------------------------------------------------------------- one shard


@dataclass
class Plan:
    """What one build does: the inputs (groups of sources, each with its output splits) and how."""

    groups: list            # [{"sources": [Source], "splits": ["train"(, "valid")], "num_shards": int}]
    mode: str               # "sft" | "text"
    fields: Fields
    tokenizer: object
    use_chat: bool
    max_length: int
    pack: int | None
    valid_fraction: float
    shard_docs: int
    skip_bad: bool
    dtype: np.dtype
    vocab_size: int
    eos: int | None
    encoding: str = "utf-8"           # jsonl inputs
    encoding_errors: str = "strict"   # "strict": undecodable bytes are a bad record; "replace": U+FFFD, counted
    allow_missing_domains: bool = False  # a domain whose every record is dropped in a split is not an error

    def work(self):
        """Every (group index, shard index) of the build, in a fixed order."""
        return [(g, k) for g, grp in enumerate(self.groups) for k in range(grp["num_shards"])]


class ShardBuilder:
    """Turns the units of one shard into one :class:`pool_format.ShardBuffer` per output split."""

    def __init__(self, plan: Plan, splits, spill: Path | None = None):
        self.plan = plan
        self.buffers = {s: pf.ShardBuffer(plan.dtype) for s in splits}
        # packing: split -> domain -> WindowPacker, its windows streamed to a file under ``spill``
        self.streams = {s: {} for s in splits}
        self.spill = spill
        self.pending = []  # text waiting for one batched encode: (text or piece, domain, split, last piece)
        self.open_doc = []  # ids of the pieces of a long text so far
        self.pending_chars = 0
        self.errors, self.dropped_no_response = [], {s: 0 for s in splits}  # per output split
        # per split, per domain: the fewest tokens a dropped record needed to keep one response token
        self.dropped_need = {s: {} for s in splits}
        self.replaced_lines = 0  # jsonl lines whose undecodable bytes became U+FFFD (--encoding-errors replace)
        self.encode = pf.batch_encoder(plan.tokenizer) if plan.mode == "text" else None

    def split_of(self, content: bytes) -> str:
        return "valid" if held_out(content, self.plan.valid_fraction) and "valid" in self.buffers else \
            next(iter(self.buffers))

    def add_unit(self, src: Source, unit: int, raw) -> None:
        plan = self.plan
        where = src.where(unit)
        if src.kind == "megatron":
            ids = np.asarray(raw)
            if len(ids) == 0:
                raise BadRecord(where, "empty_text", "empty document (no tokens)")
            if int(ids.max()) >= plan.vocab_size or int(ids.min()) < 0:
                bad = int(ids.max()) if int(ids.max()) >= plan.vocab_size else int(ids.min())
                raise BuildError(f"{where} has token id {bad}, outside the tokenizer's vocabulary of "
                                 f"{plan.vocab_size}: the indexed dataset was built with another tokenizer")
            self.add_document(ids.astype(plan.dtype, copy=False), src.domain, self.split_of(ids.tobytes()))
            return
        if isinstance(raw, bytes):
            raw, replaced = decode_line(raw, where, plan.encoding, plan.encoding_errors)
            self.replaced_lines += replaced
        parsed = parse_record(raw, where, plan.fields)
        if parsed is None:
            return
        if plan.mode == "text":
            text, domain = parsed
            split = self.split_of(text.encode("utf-8"))
            pieces = text_pieces(text, self.encode)
            for i, piece in enumerate(pieces):  # a long text: its pieces, the last one closing it
                self.pending.append((piece, domain, split, i == len(pieces) - 1))
                self.pending_chars += len(piece)
                if self.pending_chars >= TEXT_BATCH_CHARS:
                    self.flush()
            return
        prompt, response, domain = parsed
        split = self.split_of(f"{prompt}\0{response}".encode("utf-8"))
        ids, mask = pf.tokenize_example(plan.tokenizer, prompt, response, plan.use_chat)
        cut = len(ids) > plan.max_length
        if not any(mask[:plan.max_length]):
            self.dropped_no_response[split] += 1
            self.buffers[split].count(domain, "dropped_no_response", 1)
            need = next((i + 1 for i, m in enumerate(mask) if m), len(ids) + 1)
            self.dropped_need[split][domain] = min(need, self.dropped_need[split].get(domain, need))
            return
        ids, mask = ids[:plan.max_length], mask[:plan.max_length]
        self.buffers[split].add(np.asarray(ids), np.asarray(mask, dtype=np.bool_), domain, cut)

    def flush(self) -> None:
        """Encode the pending texts in one batched tokenizer call."""
        if not self.pending:
            return
        for (text, domain, split, last), ids in zip(self.pending, self.encode([p[0] for p in self.pending])):
            self.open_doc.append(np.asarray(ids, dtype=self.plan.dtype))
            if last:
                doc = self.open_doc[0] if len(self.open_doc) == 1 else np.concatenate(self.open_doc)
                self.open_doc = []
                self.add_document(doc, domain, split)
        self.pending, self.pending_chars = [], 0

    def add_document(self, ids: np.ndarray, domain: str, split: str) -> None:
        doc = pf.document_ids(ids, self.plan.eos)
        buf = self.buffers[split]
        buf.count(domain, "documents", 1)
        if self.plan.pack:
            packers = self.streams[split]
            if domain not in packers:
                if self.spill is None:
                    raise RuntimeError("internal: packing needs a spill folder")
                self.spill.mkdir(parents=True, exist_ok=True)
                path = self.spill / f"{split}-{len(packers)}.tokens"
                packers[domain] = pf.WindowPacker(self.plan.pack, split != "train", path, self.plan.dtype)
            packers[domain].add(doc)
            return
        cut = len(doc) > self.plan.max_length
        doc = doc[:self.plan.max_length]
        buf.add(doc, np.ones(len(doc), dtype=np.bool_), domain, cut)

    def finish(self) -> dict:
        """Pack the domains' streams (``--pack``) into the buffers; returns the buffers."""
        self.flush()
        for split, packers in self.streams.items():
            for domain in sorted(packers):  # the records of a shard: domain by domain, sorted
                lengths, stream_tokens, dropped = packers[domain].finish()
                self.buffers[split].add_file(packers[domain].path, lengths, domain)
                self.buffers[split].count(domain, "stream_tokens", stream_tokens)
                self.buffers[split].count(domain, "dropped_tokens", dropped)
        return self.buffers


def build_shard(plan: Plan, group: int, shard: int, staging: Path, progress) -> dict:
    """Read, tokenize and write shard ``shard`` of input group ``group``; returns its description
    (JSON-able): per output split the shard's manifest entry, plus errors and drop counts."""
    grp = plan.groups[group]
    start = shard * plan.shard_docs
    stop = min(start + plan.shard_docs, sum(s.num_units for s in grp["sources"]))
    spill = staging / f".spill-{group}-{shard}"  # packed windows on their way to the shard's files
    builder = ShardBuilder(plan, grp["splits"], spill)
    base = 0
    for src in grp["sources"]:
        lo, hi = max(start - base, 0), min(stop - base, src.num_units)
        if lo < hi:
            for unit, raw in src.read(lo, hi):
                progress.update(1)
                try:
                    builder.add_unit(src, unit, raw)
                except BadRecord as e:
                    builder.errors.append([group, base + unit, e.reason, str(e)])
                    if not plan.skip_bad:
                        return {"group": group, "shard": shard, "errors": builder.errors, "entries": {},
                                "dropped_no_response": builder.dropped_no_response,
                                "dropped_need": builder.dropped_need, "replaced_lines": builder.replaced_lines}
        base += src.num_units
    entries = {}
    for split, buf in builder.finish().items():
        folder = pf.shard_dir(grp["num_shards"], shard)
        entry = buf.write(staging / split / folder)
        entries[split] = dict(entry, dir=folder)
    shutil.rmtree(spill, ignore_errors=True)
    return {"group": group, "shard": shard, "errors": builder.errors, "entries": entries,
            "dropped_no_response": builder.dropped_no_response, "dropped_need": builder.dropped_need,
            "replaced_lines": builder.replaced_lines}


# ----------------------------------------------------------------------------- MPI helpers


def get_comm():
    """The MPI world communicator when started by an MPI launcher, else ``None`` (one process)."""
    launched = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"))
    if not launched:
        return None
    from ds_partitionsel.extras import require

    return require("mpi4py.MPI", "a build under an MPI launcher").COMM_WORLD


def _wait(request, poll_s: float = 0.005) -> None:
    """Wait for a nonblocking MPI request, sleeping between polls.

    A blocking MPI call spins at full CPU while it waits; with more ranks than cores (e.g.
    ``-n 3 --oversubscribe`` on 2 cores) the waiting ranks would steal the CPU from the ones
    still tokenizing.
    """
    while not request.Test():
        time.sleep(poll_s)


def _all_ok(comm, ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank."""
    if comm is None:
        return ok
    from mpi4py import MPI

    out = np.zeros(1, np.int64)
    flag = np.asarray([0 if ok else 1], np.int64)
    _wait(comm.Iallreduce(flag, out, op=MPI.SUM))
    return int(out[0]) == 0


def _bcast_json(comm, obj):
    """Rank 0's ``obj`` on every rank (JSON over MPI buffers; no pickle)."""
    if comm is None:
        return obj
    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8) if comm.Get_rank() == 0 else None
    size = np.asarray([0 if data is None else data.size], np.int64)
    _wait(comm.Ibcast(size, root=0))
    if data is None:
        data = np.empty(int(size[0]), np.uint8)
    _wait(comm.Ibcast(data, root=0))
    return json.loads(data.tobytes().decode("utf-8"))


def _gather_json(comm, obj) -> list | None:
    """Every rank's ``obj`` on rank 0, in rank order (JSON over MPI buffers); ``None`` elsewhere."""
    if comm is None:
        return [obj]
    rank, size = comm.Get_rank(), comm.Get_size()
    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    if rank != 0:
        _wait(comm.Isend(np.asarray([data.size], np.int64), dest=0, tag=20))
        _wait(comm.Isend(data, dest=0, tag=21))
        return None
    out = [obj]
    for r in range(1, size):
        n = np.zeros(1, np.int64)
        _wait(comm.Irecv(n, source=r, tag=20))
        buf = np.empty(int(n[0]), np.uint8)
        _wait(comm.Irecv(buf, source=r, tag=21))
        out.append(json.loads(buf.tobytes().decode("utf-8")))
    return out


# ----------------------------------------------------------------------------- driver


def make_plan(args, tokenizer) -> Plan:
    """Open every input (raises ``ValueError`` with the reason) and decide the shards."""
    pretraining = bool(args.text_field or args.megatron or args.pack)
    vocab = len(tokenizer)
    encoding = check_encoding(getattr(args, "encoding", "utf-8"))
    fields = Fields(args.prompt_field, args.response_field, args.domain_field,
                    (args.text_field or "text") if pretraining else None)
    train = [open_source(s) for s in args.train] + [open_megatron(m, vocab) for m in args.megatron]
    named = [d.strip() for d in (args.domains or "").split(",") if d.strip()] + [s.domain for s in train if s.domain]
    problems = pf.domain_name_problems(list(dict.fromkeys(named)))  # names known before tokenizing: fail early
    if problems:
        raise ValueError(f"domain names that cannot be logged: {'; '.join(problems)}")
    groups = [{"sources": train, "splits": ["train"] + (["valid"] if args.valid_fraction else [])}]
    if args.valid:
        groups.append({"sources": [open_source(s) for s in args.valid], "splits": ["valid"]})
    for grp in groups:
        n = sum(s.num_units for s in grp["sources"])
        grp["num_shards"] = max(1, -(-n // args.shard_docs))
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not pretraining and args.chat_template == "on" and not has_template:
        raise ValueError(f"--chat-template on, but tokenizer {args.tokenizer} has no chat template")
    use_chat = (has_template if args.chat_template == "auto" else args.chat_template == "on") and not pretraining
    if pretraining and tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {args.tokenizer} has no EOS token; pretraining documents are joined by EOS")
    return Plan(groups=groups, mode="text" if pretraining else "sft", fields=fields, tokenizer=tokenizer,
                use_chat=use_chat, max_length=args.max_length, pack=args.pack,
                valid_fraction=args.valid_fraction or 0.0, shard_docs=args.shard_docs, skip_bad=args.skip_bad,
                dtype=pf.token_dtype(vocab), vocab_size=vocab, eos=tokenizer.eos_token_id,
                encoding=encoding, encoding_errors=getattr(args, "encoding_errors", "strict"),
                allow_missing_domains=bool(getattr(args, "allow_missing_domains", False)))


def build(args, comm) -> int:
    from tqdm import tqdm

    rank = 0 if comm is None else comm.Get_rank()
    size = 1 if comm is None else comm.Get_size()
    clock = {"start": time.perf_counter()}
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    fail = lambda msg: print(f"error: {msg}" if size == 1 else f"error (rank {rank}): {msg}",  # noqa: E731
                             file=sys.stderr, flush=True)

    # 1. validate everything that can be checked before tokenizing, on every rank
    out = Path(os.path.abspath(args.out))
    err, plan = None, None
    try:
        tokenizer = pf.load_tokenizer(args.tokenizer)
        plan = make_plan(args, tokenizer)
    except ValueError as e:
        err = str(e)
    if rank == 0 and err is None:
        inputs = [args.tokenizer] + [f for grp in plan.groups for s in grp["sources"] for f in s.files()]
        if not out.parent.is_dir():
            err = f"parent directory of --out ({out.parent}) does not exist"
        elif out.exists() or out.is_symlink():
            err = pf.check_replaceable(out, inputs) or (
                None if args.overwrite else
                f"output {args.out} already exists; pass --overwrite to replace it (the old pool is kept if "
                f"the build fails)")
    if rank == 0 and err is None:
        for warning in input_warnings(plan):
            say(f"warning: {warning}")
    if err:
        fail(err)
    if not _all_ok(comm, err is None):
        return EXIT_BUILD_ERROR
    info = pf.tokenizer_info(tokenizer, args.tokenizer)
    staging = None
    if rank == 0:
        try:
            staging = pf.make_staging(out)
        except OSError as e:
            fail(describe_failure(e, f"cannot create a staging directory next to {out}", out.parent))
    shared = _bcast_json(comm, str(staging) if staging else None)
    if shared is None:
        return EXIT_BUILD_ERROR
    try:
        staging = Path(shared)
        clock["setup"] = time.perf_counter()

        # 2. every rank builds its shards (r, r + size, ...) and writes their files
        mine = plan.work()[rank::size]
        metas, err = [], None
        units = [sum(s.num_units for s in grp["sources"]) for grp in plan.groups]
        total = sum(max(0, min(plan.shard_docs, units[g] - k * plan.shard_docs)) for g, k in mine)
        desc = "documents" if size == 1 else f"documents (rank 0 of {size})"
        with tqdm(total=total, desc=desc, unit="doc", disable=args.quiet or rank != 0, file=sys.stderr) as bar:
            for g, k in mine:
                try:
                    meta = build_shard(plan, g, k, staging, bar)
                except BuildError as e:
                    err = str(e)
                    break
                except Exception as e:  # noqa: BLE001 - reported, so that every rank still reaches the gather
                    err = describe_failure(e, f"shard {k} of {[src.path for src in plan.groups[g]['sources']]}",
                                           out.parent)
                    break
                metas.append(meta)
                if meta["errors"] and not plan.skip_bad:
                    break
        clock["tokenize"] = time.perf_counter()
        gathered = _gather_json(comm, {"metas": metas, "error": err})

        # 3. rank 0 checks the whole, writes the manifest and renames the pool into place
        if rank == 0:
            try:
                t0 = time.perf_counter()
                err = write_manifest(args, out, staging, plan, info, gathered, say)
                if not args.quiet and err is None:
                    say(f"time (rank 0): setup {clock['setup'] - clock['start']:.2f} s, tokenize+write "
                        f"{clock['tokenize'] - clock['setup']:.2f} s, manifest {time.perf_counter() - t0:.2f} s; "
                        f"{size} worker(s)")
            except Exception as e:  # report, and let every rank exit with the same status
                err = describe_failure(e, f"writing the pool next to {out}", out.parent)
            if err:
                fail(err)
        ok = _all_ok(comm, err is None)
    finally:
        if rank == 0 and staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)  # a failed build leaves nothing behind
    return EXIT_OK if ok else EXIT_BUILD_ERROR


def write_manifest(args, out: Path, staging: Path, plan: Plan, info: dict, gathered: list, say):
    """Rank 0: check the shards' descriptions, write the manifest, commit. Returns an error or None."""
    for g in gathered:
        if g["error"]:
            return g["error"]
    metas = sorted((m for g in gathered for m in g["metas"]), key=lambda m: (m["group"], m["shard"]))
    errors = sorted((e for m in metas for e in m["errors"]), key=lambda e: (e[0], e[1]))
    if errors and not plan.skip_bad:
        return f"bad record: {errors[0][3]}\n(fix the input, or pass --skip-bad to skip and count bad records)"
    if len(metas) != len(plan.work()):
        return f"internal: {len(metas)} shard descriptions for {len(plan.work())} shards"
    splits = {}  # split -> {"shards": [...], "metas": [...], "group": g}
    for m in metas:
        for split, entry in m["entries"].items():
            s = splits.setdefault(split, {"shards": [], "metas": [], "group": m["group"]})
            s["shards"].append(entry)
            s["metas"].append(m)
    found = sorted({d for s in splits.values() for e in s["shards"] for d in e["domains"]})
    if args.domains:
        names = [d.strip() for d in args.domains.split(",") if d.strip()]
        if len(set(names)) != len(names):
            return f"--domains lists a name twice: {names}"
        unknown = [d for d in found if d not in names]
        if unknown:
            return f"records have domains {unknown} that --domains {args.domains!r} does not list"
    else:
        names = found
    problems = pf.domain_name_problems(names)
    if problems:
        return f"domain names that cannot be logged: {'; '.join(problems)}"
    per_split = {split: pf.merge_per_domain(e.pop("per_domain") for e in s["shards"]) for split, s in splits.items()}
    problem = check_vanished_domains(plan, per_split, metas)
    if problem:
        return problem
    if plan.mode == "text":
        problem = check_pretraining_splits(plan, per_split)
        if problem:
            return problem
    for split, s in splits.items():
        if not sum(e["num_records"] for e in s["shards"]):
            srcs = [src.path for src in plan.groups[s["group"]]["sources"]]
            if plan.pack and any(c.get("documents") for c in per_split[split].values()):
                return (f"split {split!r} has no window of --pack {plan.pack} tokens: its documents hold fewer "
                        f"tokens than one window (inputs: {srcs}); lower --pack or add text")
            return f"split {split!r} has no usable records (inputs: {srcs})"

    manifest = {
        "format": pf.FORMAT_NAME, "format_version": pf.FORMAT_VERSION,
        "tokenizer": info, "max_length": plan.pack or plan.max_length,
        "candidates": "sft" if plan.mode == "sft" else ("window" if plan.pack else "document"),
        "template": ("chat" if plan.use_chat else "plain") if plan.mode == "sft" else "none",
        "pack": plan.pack, "valid_fraction": plan.valid_fraction or None, "shard_docs": plan.shard_docs,
        "fields": ({"prompt": args.prompt_field, "response": args.response_field, "domain": args.domain_field}
                   if plan.mode == "sft" else {"text": plan.fields.text, "domain": args.domain_field}),
        "domains": names, "splits": {},
    }
    for split in sorted(splits, key=lambda s: (s != "train", s)):
        s = splits[split]
        grp = plan.groups[s["group"]]
        shard_errors = [e for m in s["metas"] for e in m["errors"]]
        manifest["splits"][split] = {
            "num_records": sum(e["num_records"] for e in s["shards"]),
            "num_tokens": sum(e["num_tokens"] for e in s["shards"]),
            "num_loss_tokens": sum(c["loss_tokens"] for c in per_split[split].values()),
            "per_domain": per_split[split],
            "shards": s["shards"],
            "sources": [{"path": src.path, "kind": src.kind, "sha256": src.sha256,
                         **({"domain": src.domain} if src.domain else {})} for src in grp["sources"]],
            "held_out": ("valid_fraction" if split == "valid" else "rest after valid_fraction")
            if plan.valid_fraction else None,
            "skipped_bad": skipped_counts(shard_errors) if split == grp["splits"][0] else {},
            "dropped_no_response_after_truncation": sum(m["dropped_no_response"].get(split, 0)
                                                        for m in s["metas"]),
            "missing_domains": sorted(d for d, c in per_split[split].items() if not c["records"]),
            "replaced_undecodable_lines": sum(m["replaced_lines"] for m in s["metas"])
            if split == grp["splits"][0] else 0,
        }
    if plan.encoding != "utf-8" or plan.encoding_errors != "strict":
        manifest["text_encoding"] = {"encoding": plan.encoding, "errors": plan.encoding_errors}
    with open(staging / pf.MANIFEST, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    inputs = [args.tokenizer] + [f for grp in plan.groups for src in grp["sources"] for f in src.files()]
    try:
        pf.commit_pool(staging, out, inputs, overwrite=args.overwrite)
    except pf.PoolFormatError as e:  # --out changed while this build ran
        return str(e)
    if not args.quiet:
        say(summary(manifest, errors))
        say(f"wrote {out}")
    return None


def check_vanished_domains(plan: Plan, per_split: dict, metas: list):
    """A domain that has input in a split but no candidate left there is an error (unless
    ``--allow-missing-domains``). Fine-tuning: every record was cut before its first response
    token. Packed text: the domain's stream is shorter than one window (training split; the
    validation split keeps its remainder). Returns an error message or None."""
    if plan.allow_missing_domains:
        return None
    cut = []  # fine-tuning: (split, domain, records dropped, fewest tokens before a response token)
    for split in sorted(per_split, key=lambda s: (s != "train", s)):
        for domain, c in per_split[split].items():
            if c["records"]:
                continue
            if c.get("dropped_no_response"):
                need = min(m["dropped_need"][split][domain] for m in metas
                           if domain in m["dropped_need"].get(split, {}))
                cut.append((split, domain, c["dropped_no_response"], need - 1))
            elif plan.pack and c.get("documents"):
                name = {"train": "training", "valid": "validation"}.get(split, split)
                return (f"domain {domain!r} has {c.get('stream_tokens', 0)} tokens in the {name} split, fewer than "
                        f"one window of --pack {plan.pack} (windows are made within each shard of --shard-docs "
                        f"{plan.shard_docs} documents), so it has no candidate there; lower --pack, add text for "
                        f"{domain!r}, or pass --allow-missing-domains to build without it")
    if not cut:
        return None
    (split, domain, n, prompt), others = cut[0], cut[1:]
    what = "prompt, chat template included," if plan.use_chat else "prompt"
    also = "".join(f"; likewise domain {d!r} in the {s} split ({k} records, shortest prompt {p} tokens)"
                   for s, d, k, p in others)
    return (f"every record of domain {domain!r} in the {split} split was dropped: all {n} are longer than "
            f"--max-length {plan.max_length} after the prompt, so no response token is left to train on (the "
            f"shortest {what} takes {prompt} tokens){also}; raise --max-length above "
            f"{max(p for *_, p in cut)}, or pass --allow-missing-domains to build without "
            f"{'them' if others else repr(domain) + ' in ' + split}")


def check_pretraining_splits(plan: Plan, per_split: dict):
    """Every training domain needs validation documents (when there is a validation split); a
    domain with no window at all is :func:`check_vanished_domains`' case. Returns an error message or None."""
    train = per_split.get("train", {})
    if "valid" in per_split:
        lacking = [d for d in train if not per_split["valid"].get(d, {}).get("records")]
        if lacking:
            how = (f"raise --valid-fraction (now {plan.valid_fraction})" if plan.valid_fraction
                   else "add documents of these domains to the --valid files")
            return f"domain(s) {lacking} have no validation documents; {how}"
        extra = [d for d in per_split["valid"] if d not in train]
        if extra:
            return f"domain(s) {extra} appear in the validation split but not in the training split"
    return None


def skipped_counts(errors) -> dict:
    counts = {}
    for e in errors:
        counts[e[2]] = counts.get(e[2], 0) + 1
    return dict(sorted(counts.items()))


def summary(manifest: dict, errors: list) -> str:
    lines = [f"tokenizer {manifest['tokenizer']['name_or_path']}  candidates={manifest['candidates']}  "
             f"template={manifest['template']}  max_length={manifest['max_length']}"]
    lines.append(f"{'split':6s} {'domain':12s} {'records':>8s} {'tokens':>10s} {'truncated':>9s} {'docs':>8s} "
                 f"{'dropped tok':>11s}")
    for split, entry in manifest["splits"].items():
        for d, c in entry["per_domain"].items():
            lines.append(f"{split:6s} {d:12s} {c['records']:8d} {c['tokens']:10d} {c['truncated']:9d} "
                         f"{c.get('documents', c['records']):8d} {c.get('dropped_tokens', 0):11d}")
        extra = []
        if entry["skipped_bad"]:
            extra.append(f"skipped bad records {entry['skipped_bad']}")
            for e in errors[:5]:
                extra.append(f"  {e[3]}")
        if entry["dropped_no_response_after_truncation"]:
            by_domain = {d: c["dropped_no_response"] for d, c in entry["per_domain"].items()
                         if c.get("dropped_no_response")}
            extra.append(f"dropped {entry['dropped_no_response_after_truncation']} records with no response "
                         f"token left after truncation to {manifest['max_length']} {by_domain}")
        if entry.get("missing_domains"):
            extra.append(f"no candidates left for domain(s) {entry['missing_domains']} (allowed by "
                         f"--allow-missing-domains)")
        if entry.get("replaced_undecodable_lines"):
            extra.append(f"replaced undecodable bytes by U+FFFD in {entry['replaced_undecodable_lines']} lines "
                         f"(--encoding-errors replace)")
        lines += [f"{split:6s} {x}" for x in extra]
    return "\n".join(lines)
