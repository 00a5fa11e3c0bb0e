#!/usr/bin/env python
"""Benchmark ``npu-dsv3 data preprocess`` against the tokenizer's own batch encoding.

    python benchmarks/data.py            # 32 MiB of jsonl (about half a minute on 2 cores)
    python benchmarks/data.py --mb 8     # smaller

What is measured, on the same text:

- the tokenizer alone: ``tokenizer(texts)`` in batches of 1000 (what preprocessing calls),
  in this process, text already in memory; HF's own thread pool on (its default). The
  ceiling: preprocessing also reads and parses JSON and writes the ``.bin/.idx``.
- ``npu-dsv3 data preprocess --append-eod`` with ``--workers 1`` and ``--workers 2``, each a
  subprocess started as users start it (the console script). Wall time includes Python
  start-up and imports; the summary's own ``seconds`` does not (the rate that governs a
  large job).

The text: the bundled corpus (``npu_dsv3/data/corpus/pretrain.jsonl``) repeated, each copy
with its sentences shuffled, until ``--mb`` MiB of jsonl. The tokenizer: the stand-in trained
on that corpus (byte-level BPE, DeepSeek-V3's special tokens, 800 ids): DeepSeek-V3's own
(128k ids) is slower per token, so the ratios, not the absolute rates, carry over.
Prints one line per measurement and a summary line.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import cpu_model, usable_cores  # noqa: E402

from npu_dsv3.data import corpus  # noqa: E402


def make_input(path: str, mb: float) -> list:
    with open(corpus.path("pretrain.jsonl"), encoding="utf-8") as f:
        sentences = [s.strip() + "." for r in map(json.loads, f) for s in r["text"].split(".") if s.strip()]
    rng = random.Random(0)
    texts, size = [], 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * (1 << 20):
            text = " ".join(rng.sample(sentences, rng.randint(5, 40)))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            texts.append(text)
            size += len(line.encode())
    return texts


def tokenizer_alone(tok_dir: str, texts: list) -> tuple:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    start = time.perf_counter()
    tokens = sum(len(ids) for i in range(0, len(texts), 1000)
                 for ids in tok(texts[i:i + 1000], add_special_tokens=True)["input_ids"])
    return tokens + len(texts), time.perf_counter() - start  # + the eod preprocessing appends


def preprocess(src: str, tok_dir: str, out: str, workers: int) -> tuple:
    cmd = ["npu-dsv3", "data", "preprocess", "--input", src, "--tokenizer-name-or-path", tok_dir,
           "--output-prefix", out, "--append-eod", "--workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return summary["tokens"], wall, summary["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=32.0, help="MiB of jsonl to process (default 32)")
    args = parser.parse_args()
    print(f"machine: {usable_cores()} cores, {cpu_model()}")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = corpus.build_tokenizer(os.path.join(tmp, "tokenizer"))
        src = os.path.join(tmp, "input.jsonl")
        texts = make_input(src, args.mb)
        tokens, seconds = tokenizer_alone(tok_dir, texts)
        base = tokens / seconds
        print(f"tokenizer batch encode: {len(texts)} docs, {tokens} tokens in {seconds:.2f} s = {base:,.0f} tokens/s")
        rates = {}
        for workers in (1, 2):
            n, wall, inside = preprocess(src, tok_dir, os.path.join(tmp, f"w{workers}"), workers)
            assert n == tokens, f"preprocess wrote {n} tokens, the tokenizer made {tokens}"
            rates[workers] = n / inside
            print(f"preprocess --workers {workers}: {n} tokens, wall {wall:.2f} s = {n / wall:,.0f} tokens/s, "
                  f"in-process {inside:.2f} s = {n / inside:,.0f} tokens/s ({n / inside / base:.2f} x tokenizer)")
    print(f"summary: {args.mb:g} MiB jsonl, tokenizer {base:,.0f} tokens/s; preprocess in-process "
          f"{rates[1]:,.0f} tokens/s ({rates[1] / base:.2f} x) with 1 worker, "
          f"{rates[2]:,.0f} tokens/s ({rates[2] / base:.2f} x) with 2")


if __name__ == "__main__":
    main()
