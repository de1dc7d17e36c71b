#!/usr/bin/env python
"""Benchmark tools/build_pool.py on pretraining text against the tokenizer it is built on.

For each corpus size (``--sizes-mb``, default 100 and 1000 MB of jsonl) the same run measures:

- ``tokenizer``: the limit, the raw batched fast-tokenizer call on the corpus's own text
  (``backend.encode_batch_fast`` on 1 MB batches, ids fetched; its first ``--baseline-mb`` MB),
  in tokens per second on one core;
- ``build``: ``build_pool.py --text-field text --pack 256 --valid-fraction 0.05`` on the whole
  corpus (one worker, or ``mpiexec -n W`` with ``--workers W``): tokens per second per worker
  (tokens = what the tokenizer produced, EOS excluded; time = the whole command, start-up,
  input hashing and writing included) and the peak resident memory of the build process (the
  largest rank under mpiexec);

and reports, side by side, build / tokenizer throughput (target >= 0.70) and the peak RSS of
the largest corpus over the smallest (target <= 1.2: memory must not grow with the corpus).

First (``--repeats 1 8``), the memory target as stated for pools: a packed build (``--pack``,
a ``--valid`` file) of the real documents once and repeated 8 times over, as many small
documents (the records and source files) and as few large ones (each domain joined into
~500 KB documents), with one worker and under ``mpiexec -n --mpi-workers``: peak RSS of the
8x build / the 1x build, target <= 1.2 for every case. ``--memory-only`` skips the rest.
Throughput is given per wall-clock second and per CPU second (user + system, of the build's
processes; of the tokenizer loop); the ratio judged against the target is the CPU one, because
on a shared machine the two sides of a wall-clock ratio run under different loads.

The corpus is real text repeated: the demo data's records (math, molecules, code; as plain text,
python tools/fetch_demo_data.py) and the Python standard library's own .py files (code), cycled
until the size is reached. Prints a table, writes JSON (``--out``).

    python tools/bench_build.py --out runs/bench_build.json                 # 100 MB and 1 GB
    python tools/bench_build.py --sizes-mb 10 50 --out runs/bench_build_quick.json
    python tools/bench_build.py --memory-only --out runs/bench_build_memory.json  # the 1x/8x target
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ds_partitionsel import pool_format as pf  # noqa: E402
from ds_partitionsel.pool_builder import TEXT_BATCH_CHARS  # noqa: E402

from ds_partitionsel.bench_inputs import ensure_demo_data, ensure_model  # noqa: E402

TARGET_THROUGHPUT = 0.70
TARGET_RSS = 1.2


def real_documents() -> list:
    """Real documents ``{"text", "domain"}``: the demo records and the stdlib's .py sources."""
    docs = []
    demo = ensure_demo_data() / "train.jsonl"  # generated on first use
    for line in open(demo, encoding="utf-8"):
        rec = json.loads(line)
        docs.append({"text": rec["prompt"] + "\n" + rec["response"], "domain": rec["domain"]})
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        if 0 < len(text) <= 200_000:
            docs.append({"text": text, "domain": "python"})
    return docs


def make_corpus(path: Path, size_mb: float, docs: list) -> Path:
    """Cycle ``docs`` into a jsonl file of about ``size_mb`` MB (reused when already there)."""
    target = int(size_mb * 1e6)
    if path.is_file() and abs(path.stat().st_size - target) < 300_000:
        return path
    lines = [(json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8") for d in docs]
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "wb") as f:
        while written < target:
            for line in lines:
                f.write(line)
                written += len(line)
                if written >= target:
                    break
    os.replace(tmp, path)
    return path


def tokenizer_throughput(tok_path: str, corpus: Path, limit_mb: float) -> dict:
    """Tokens/s of the raw batched fast tokenizer on the first ``limit_mb`` MB of the corpus."""
    tok = pf.load_tokenizer(tok_path)
    backend = tok.backend_tokenizer
    batch_chars = TEXT_BATCH_CHARS  # the batches the builder hands to the tokenizer
    batches, batch, chars, read = [], [], 0, 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            read += len(line)
            text = json.loads(line)["text"]
            batch.append(text)
            chars += len(text)
            if chars >= batch_chars:
                batches.append(batch)
                batch, chars = [], 0
            if read >= limit_mb * 1e6:
                break
    if batch:
        batches.append(batch)
    tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
    for b in batches:
        for e in backend.encode_batch_fast(b, add_special_tokens=False):
            tokens += len(e.ids)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu, "mb": read / 1e6}


RSS_WRAPPER = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print("PEAK_RSS_KB", u.ru_maxrss, "CPU_S", u.ru_utime + u.ru_stime, flush=True)
sys.exit(r.returncode)
"""


def large_documents(docs: list, chars: int = 500_000) -> list:
    """The same text as few large documents: each domain's documents joined into ~``chars``."""
    by_domain, out = {}, []
    for d in docs:
        by_domain.setdefault(d["domain"], []).append(d["text"])
    for domain, texts in sorted(by_domain.items()):
        cur, size = [], 0
        for t in texts:
            cur.append(t)
            size += len(t)
            if size >= chars:
                out.append({"text": "\n".join(cur), "domain": domain})
                cur, size = [], 0
        if cur:
            out.append({"text": "\n".join(cur), "domain": domain})
    return out


def write_repeated(path: Path, docs: list, times: int) -> Path:
    """``docs`` written ``times`` times over into a jsonl file (reused when already there)."""
    lines = [(json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8") for d in docs]
    if path.is_file() and path.stat().st_size == times * sum(map(len, lines)):
        return path
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for _ in range(times):
            f.writelines(lines)
    os.replace(tmp, path)
    return path


def memory_cases(args, work: Path, docs: list) -> list:
    """Peak RSS of a packed build with a --valid file, the corpus once and repeated
    ``max(args.repeats)`` times, for many small and for few large documents, one worker and
    ``--mpi-workers``; each 8x/1x ratio against TARGET_RSS."""
    valid_docs = [d for i, d in enumerate(docs) if i % 20 == 0]
    valid = write_repeated(work / "mem_valid.jsonl", valid_docs, 1)
    shapes = {"small": docs, "large": large_documents(docs)}
    rows = []
    for shape, shape_docs in shapes.items():
        for workers in sorted({1, args.mpi_workers}):
            peaks = {}
            for times in args.repeats:
                corpus = write_repeated(work / f"mem_{shape}_{times}x.jsonl", shape_docs, times)
                print(f"[memory] {shape} documents x{times}, {workers} worker(s) ...", file=sys.stderr, flush=True)
                build = run_build(args.tokenizer, corpus, work / "mem_pool", workers, args.pack, valid=valid)
                peaks[times] = build
            lo, hi = min(args.repeats), max(args.repeats)
            ratio = peaks[hi]["peak_rss_mb"] / peaks[lo]["peak_rss_mb"]
            rows.append({"shape": shape, "documents": len(shape_docs), "workers": workers,
                         "builds": {str(t): b for t, b in peaks.items()}, "repeat_low": lo, "repeat_high": hi,
                         "rss_ratio": ratio, "met": ratio <= TARGET_RSS})
    import shutil

    shutil.rmtree(work / "mem_pool", ignore_errors=True)
    return rows


def run_build(tok_path: str, corpus: Path, out: Path, workers: int, pack: int, valid: Path | None = None) -> dict:
    """Build the pool in a fresh process (under mpiexec when workers > 1); wall time and peak RSS
    (the largest process). ``valid``: a --valid file instead of --valid-fraction 0.05."""
    held = ["--valid", str(valid)] if valid else ["--valid-fraction", "0.05"]
    cmd = [sys.executable, str(REPO / "tools" / "build_pool.py"), "--tokenizer", tok_path, "--train", str(corpus),
           "--text-field", "text", "--pack", str(pack), *held, "--out", str(out),
           "--overwrite", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO))
    if workers > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        cmd = [str(mpiexec), "-n", str(workers), "--oversubscribe", "--mca", "btl", "self,sm",
               "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", "-x", "TOKENIZERS_PARALLELISM", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"build failed:\n{proc.stderr[-3000:]}")
    fields = proc.stdout.split("PEAK_RSS_KB")[-1].split()
    rss_kb, cpu_s = int(fields[0]), float(fields[2])
    manifest = pf.read_manifest(out)
    per = [c for s in manifest["splits"].values() for c in s["per_domain"].values()]
    tokens = sum(c["stream_tokens"] - c["documents"] for c in per)  # what the tokenizer produced
    return {"workers": workers, "seconds": seconds, "cpu_seconds": cpu_s, "tokens": tokens, "documents": sum(c["documents"] for c in per),
            "records": sum(s["num_records"] for s in manifest["splits"].values()),
            "shards": len(manifest["splits"]["train"]["shards"]),
            "tokens_per_s_per_worker": tokens / seconds / workers, "tokens_per_cpu_s": tokens / cpu_s,
            "peak_rss_mb": rss_kb / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=str(REPO / ".cache" / "models" / "smollm2-135m"))
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 1000])
    ap.add_argument("--workers", type=int, default=1, help="build workers (mpiexec -n W when > 1)")
    ap.add_argument("--pack", type=int, default=256)
    ap.add_argument("--baseline-mb", type=float, default=32, help="MB of the corpus the tokenizer baseline reads")
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "bench_build"), help="corpora and pools go here")
    ap.add_argument("--keep", action="store_true", help="keep the corpora and pools (default: delete pools)")
    ap.add_argument("--out", default="runs/bench_build.json")
    ap.add_argument("--repeats", type=int, nargs="+", default=[1, 8],
                    help="memory target: the corpus once and this many times over (peak RSS ratio <= 1.2)")
    ap.add_argument("--mpi-workers", type=int, default=2, help="the memory target under mpiexec -n W too")
    ap.add_argument("--memory-only", action="store_true", help="only the memory target, not the throughput one")
    args = ap.parse_args(argv)
    ensure_model(args.tokenizer)  # the default tokenizer is fetched on first use
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    docs = real_documents()
    memory = memory_cases(args, work, docs) if len(args.repeats) > 1 else []
    rows = []
    for size in ([] if args.memory_only else sorted(args.sizes_mb)):
        print(f"[{size:g} MB] writing the corpus ...", file=sys.stderr, flush=True)
        corpus = make_corpus(work / f"corpus_{size:g}mb.jsonl", size, docs)
        print(f"[{size:g} MB] tokenizer baseline on {min(size, args.baseline_mb):g} MB ...", file=sys.stderr,
              flush=True)
        base = tokenizer_throughput(args.tokenizer, corpus, args.baseline_mb)
        print(f"[{size:g} MB] build_pool with {args.workers} worker(s) ...", file=sys.stderr, flush=True)
        pool = work / f"pool_{size:g}mb"
        build = run_build(args.tokenizer, corpus, pool, args.workers, args.pack)
        if not args.keep:
            import shutil

            shutil.rmtree(pool, ignore_errors=True)
        row = {"size_mb": size, "corpus_bytes": corpus.stat().st_size, "tokenizer": base, "build": build,
               "throughput_ratio": build["tokens_per_cpu_s"] / base["tokens_per_cpu_s"],
               "throughput_ratio_wall": build["tokens_per_s_per_worker"] / base["tokens_per_s"]}
        rows.append(row)
        print(f"[{size:g} MB] {build['tokens']} tokens in {build['seconds']:.1f} s, "
              f"ratio {row['throughput_ratio']:.2f}, peak RSS {build['peak_rss_mb']:.0f} MB", file=sys.stderr,
              flush=True)
    if memory:
        lo, hi = memory[0]["repeat_low"], memory[0]["repeat_high"]
        head = f"{'documents':>10s} {'count':>6s} {'workers':>7s} {f'peak MB x{lo}':>11s} {f'peak MB x{hi}':>11s} {'ratio':>6s}"
        print(head)
        print("-" * len(head))
        for m in memory:
            b = m["builds"]
            print(f"{m['shape']:>10s} {m['documents']:6d} {m['workers']:7d} {b[str(lo)]['peak_rss_mb']:11.0f} "
                  f"{b[str(hi)]['peak_rss_mb']:11.0f} {m['rss_ratio']:6.2f}")
        worst_mem = max(m["rss_ratio"] for m in memory)
        print(f"\nmemory: peak RSS, corpus x{hi} / x{lo} (--pack {args.pack}, a --valid file) = {worst_mem:.2f} at "
              f"worst (target <= {TARGET_RSS}): {'met' if worst_mem <= TARGET_RSS else 'NOT met'}\n")
    if not rows:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as fh:
            json.dump({"meta": {"python": sys.version.split()[0], "cpus": os.cpu_count(), "pack": args.pack,
                                "command": sys.argv}, "memory": memory,
                       "targets": {"rss_ratio": TARGET_RSS}}, fh, indent=2)
        print(f"wrote {out}")
        return 0
    rss_ratio = rows[-1]["build"]["peak_rss_mb"] / rows[0]["build"]["peak_rss_mb"] if len(rows) > 1 else None
    head = (f"{'corpus':>8s} {'docs':>9s} {'tokens':>12s} {'shards':>6s} {'build s':>8s} {'build tok/s/w':>13s} "
            f"{'tokenizer tok/s':>15s} {'wall ratio':>10s} {'build tok/cpu-s':>15s} {'tokenizer tok/cpu-s':>19s} "
            f"{'ratio':>6s} {'peak RSS MB':>11s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        b = r["build"]
        print(f"{r['size_mb']:>6g}MB {b['documents']:9d} {b['tokens']:12d} {b['shards']:6d} {b['seconds']:8.1f} "
              f"{b['tokens_per_s_per_worker']:13.0f} {r['tokenizer']['tokens_per_s']:15.0f} "
              f"{r['throughput_ratio_wall']:10.2f} {b['tokens_per_cpu_s']:15.0f} "
              f"{r['tokenizer']['tokens_per_cpu_s']:19.0f} {r['throughput_ratio']:6.2f} {b['peak_rss_mb']:11.0f}")
    worst = min(r["throughput_ratio"] for r in rows)
    print(f"\nthroughput: build / tokenizer = {worst:.2f} at worst (target >= {TARGET_THROUGHPUT}): "
          f"{'met' if worst >= TARGET_THROUGHPUT else 'NOT met'}")
    if rss_ratio is not None:
        print(f"peak RSS {rows[-1]['size_mb']:g} MB / {rows[0]['size_mb']:g} MB corpus = {rss_ratio:.2f} "
              f"(target <= {TARGET_RSS}): {'met' if rss_ratio <= TARGET_RSS else 'NOT met'}")
    meta = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "tokenizer": args.tokenizer, "pack": args.pack, "workers": args.workers, "command": sys.argv}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"meta": meta, "results": rows, "memory": memory, "min_throughput_ratio": worst, "rss_ratio": rss_ratio,
                   "targets": {"throughput_ratio": TARGET_THROUGHPUT, "rss_ratio": TARGET_RSS}}, fh, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
