"""4-bit weight-only quantization of a real decoder LM, judged by perplexity (issue 17's first figures).

The model is SmolLM2-135M-Instruct exported by ONNX Runtime GenAI's builder (``models/llm/export_smollm2.py``,
fp32, CPU, KV cache, GroupQueryAttention). The text is public-domain prose available offline: the docstrings of
Python standard-library modules, tokenized with the model's own tokenizer, cut into fixed windows; every variant
sees the same tokens. Each window runs as one prompt (past length 0): perplexity of its next tokens, and next-token
top-1 agreement with the fp32 model. Variants, in one run: graphopt ``weight_only`` (round to nearest, block 32 and
128) and ONNX Runtime's ``MatMulNBitsQuantizer`` (its default RTN, same blocks). Prints a Markdown table.

    python bench/bench_llm.py [--model DIR/model.onnx] [--windows 8] [--tokens 128]

Caveat (issue 17): the weights come from a Q4_1 GGUF file, so each 32-value block holds at most 16 distinct
values and asymmetric int4 with block 32 reproduces them almost exactly; block 128 is the telling column.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("argparse", "collections", "json", "pathlib", "subprocess", "typing", "unittest", "logging", "decimal",
           "fractions", "heapq", "itertools", "functools", "textwrap", "threading", "zipfile")  # fmt: skip


def text() -> str:
    parts = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, member in inspect.getmembers(module):
            if (inspect.isclass(member) or inspect.isfunction(member)) and getattr(member, "__module__", "") == name:
                parts.append(inspect.getdoc(member) or "")
    return "\n\n".join(p for p in parts if p)


def windows(model_dir: Path, count: int, tokens: int) -> list[np.ndarray]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text()).ids
    step = len(ids) // count
    return [np.asarray(ids[i * step : i * step + tokens], np.int64)[None, :] for i in range(count)]


HEAD: dict[str, int] = {}  # KV heads and head size, from the export's genai_config.json


def feeds(session: object, window: np.ndarray) -> dict[str, np.ndarray]:
    """One prompt: the window's tokens and an empty KV cache (past length 0)."""
    batch, length = window.shape
    out = {"input_ids": window, "attention_mask": np.ones((batch, length), np.int64)}
    for spec in session.get_inputs():  # type: ignore[attr-defined]
        if spec.name.startswith("past_key_values"):
            out[spec.name] = np.zeros((batch, HEAD["kv_heads"], 0, HEAD["size"]), np.float32)
    return out


def evaluate(path: Path, texts: list[np.ndarray], reference: list[np.ndarray] | None) -> tuple[float, float, list]:
    """Perplexity of the next tokens, top-1 agreement with ``reference``'s argmaxes, and this model's argmaxes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    nll, count, agree, argmaxes = 0.0, 0, 0, []
    for i, window in enumerate(texts):
        logits = session.run(["logits"], feeds(session, window))[0][0].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        targets = window[0, 1:]
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
        top = logits.argmax(-1)
        argmaxes.append(top)
        if reference is not None:
            agree += int((top == reference[i]).sum())
    return float(np.exp(nll / count)), agree / sum(len(a) for a in argmaxes) if reference else 1.0, argmaxes


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def graphopt_int4(src: Path, dst: Path, block: int, options: str = "") -> None:
    argv = [sys.executable, "-m", "graphopt.cli", "optimize", str(src), "-o", str(dst), "--external-data"]
    argv += ["--pass", f"weight_only:bits=4,block_size={block}{options}", "--no-verify"]
    subprocess.run(argv, check=True, capture_output=True)


# graphopt's variants: extra weight_only options, "" for the defaults
GRAPHOPT_OPTIONS = ("", "tied=true", "tied=true,embedding_bits=8", "symmetric=false", "tied=true,symmetric=false")


def ort_int4(src: Path, dst: Path, block: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(model, block_size=block, is_symmetric=False)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path.home() / ".cache" / "graphopt" / "llm" / "smollm2-135m-fp32-cpu" / "model.onnx"
    parser.add_argument("--model", type=Path, default=default)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        print(f"{args.model}: not found; export it first with models/llm/export_smollm2.py", file=sys.stderr)
        return 2
    decoder = json.loads((args.model.parent / "genai_config.json").read_text())["model"]["decoder"]
    HEAD.update(kv_heads=int(decoder["num_key_value_heads"]), size=int(decoder["head_size"]))
    texts = windows(args.model.parent, args.windows, args.tokens)
    base_ppl, _, reference = evaluate(args.model, texts, None)
    rows = [{"variant": "fp32 (builder export)", "ppl": base_ppl, "top1": 1.0, "bytes": size(args.model), "s": 0.0}]
    with tempfile.TemporaryDirectory() as tmp:
        tools: list[tuple[str, Callable[[Path, Path, int], None]]] = [
            (
                f"graphopt weight_only rtn {o.replace(',', ' ')}".rstrip(),
                partial(graphopt_int4, options=f",{o}" * bool(o)),
            )
            for o in GRAPHOPT_OPTIONS
        ]
        tools.append(("ORT MatMulNBitsQuantizer rtn", ort_int4))
        for tool, make in tools:
            for block in (32, 128):
                dst = Path(tmp) / f"{tool.replace(' ', '-').replace('=', '')}-{block}" / "model.onnx"
                dst.parent.mkdir()
                start = time.perf_counter()
                make(args.model, dst, block)
                seconds = time.perf_counter() - start
                ppl, top1, _ = evaluate(dst, texts, reference)
                rows.append({"variant": f"{tool}, int4 block {block}", "ppl": ppl, "top1": top1, "bytes": size(dst),
                             "s": seconds})  # fmt: skip
    print(f"{args.windows} windows x {args.tokens} tokens of stdlib docstrings; fp32 perplexity {base_ppl:.3f}\n")
    print("| variant | perplexity | increase vs fp32 | next-token top-1 vs fp32 | files MB | quantize s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['ppl']:.3f} | {r['ppl'] / base_ppl - 1:+.2%} | {r['top1']:.4f} "
              f"| {r['bytes'] / 1e6:.1f} | {r['s']:.1f} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
