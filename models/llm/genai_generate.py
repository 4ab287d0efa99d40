"""Greedy generation with ONNX Runtime GenAI from an exported model folder, and from a graphopt output of it.

graphopt writes only ``model.onnx`` (+ data); GenAI also reads ``genai_config.json`` and the tokenizer files,
which this script copies from the export next to the quantized model. It prints each model's continuation of a few
prompts, their tokens/s, and how many of the generated tokens agree with the first model's. Run it in the builder's
environment (see export_smollm2.py)::

    ~/.cache/graphopt/llm-venv/bin/python models/llm/genai_generate.py EXPORT_DIR [QUANTIZED_DIR ...] [--tokens 48]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "A list in Python is",
)
FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def complete(folder: Path, export: Path) -> Path:
    """``folder`` with the export's GenAI config and tokenizer files beside its model.onnx."""
    for name in FILES:
        if (export / name).is_file() and not (folder / name).is_file():
            shutil.copy(export / name, folder / name)
    return folder


def generate(folder: Path, tokens: int) -> tuple[list[list[int]], float, str]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    outputs, produced, seconds = [], 0, 0.0
    for prompt in PROMPTS:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(tokenizer.encode(prompt)) + tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(tokenizer.encode(prompt))
        start = time.perf_counter()
        new = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        seconds += time.perf_counter() - start
        produced += len(new)
        outputs.append(new)
    sample = tokenizer.decode(outputs[0]).replace("\n", " ")[:100]
    return outputs, produced / seconds, sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("quantized", type=Path, nargs="*")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args(argv)
    reference = None
    print("| model | tokens/s | tokens equal to the first model's | first prompt's continuation |")
    print("|---|---:|---:|---|")
    for folder in [args.export, *args.quantized]:
        outputs, rate, sample = generate(complete(folder, args.export), args.tokens)
        if reference is None:
            reference = outputs
        same = sum(sum(a == b for a, b in zip(o, r, strict=False)) for o, r in zip(outputs, reference, strict=True))
        total = sum(len(r) for r in reference)
        print(f"| {folder.name} | {rate:.1f} | {same}/{total} | {sample} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
