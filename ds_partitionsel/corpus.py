"""A raw-text pretraining corpus from the demo data, and a BPE tokenizer trained on it (the
pretraining demo and ``tools/evidence.py`` share both)."""
from __future__ import annotations

import json
import os
import sysconfig

__all__ = ["write_corpus", "train_tokenizer"]


def write_corpus(data_dir: str, path: str) -> dict:
    """Raw-text corpus jsonl ``{"text", "domain"}`` at ``path``: the records of
    ``data_dir/{train,valid}.jsonl`` as documents (prompt + response) plus this Python's standard
    library ``.py`` files (domain ``python``). Returns documents per domain."""
    counts = {}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for split in ("train", "valid"):
            with open(os.path.join(data_dir, f"{split}.jsonl"), encoding="utf-8") as fh:
                for line in fh:
                    rec = json.loads(line)
                    out.write(json.dumps({"text": rec["prompt"] + "\n" + rec["response"], "domain": rec["domain"]},
                                         ensure_ascii=False) + "\n")
                    counts[rec["domain"]] = counts.get(rec["domain"], 0) + 1
        stdlib = sysconfig.get_paths()["stdlib"]
        for name in sorted(os.listdir(stdlib)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="ignore") as fh:
                text = fh.read()
            if text.strip() and len(text) <= 200_000:
                out.write(json.dumps({"text": text, "domain": "python"}, ensure_ascii=False) + "\n")
                counts["python"] = counts.get("python", 0) + 1
    os.replace(tmp, path)
    return counts


def train_tokenizer(corpus: str, out_dir: str, vocab_size: int) -> None:
    """Byte-level BPE (``<pad>``, ``<eos>`` specials) trained on the corpus' ``text`` fields,
    saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(corpus, encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)["text"]

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts(), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>").save_pretrained(out_dir)
