"""HQQ-style refinement on top of graphopt's round-to-nearest, measured on SmolLM2 (issue 17): is it worth building?

HQQ (Badri & Shaji, 2023) refines each block's zero point, without calibration data, by half-quadratic splitting of
an Lp error (p < 1). ONNX Runtime's own HQQ writes float zero points, which leave MatMulNBits' fast kernel
(``bench_llm.py``: 3 tokens/s against 35). What graphopt could ship keeps integer zero points (and, for symmetric
blocks, which have none, moves the scale), so this script carries that refinement itself and measures it against
the pass's round-to-nearest with clip search, which it starts from:

- weight reconstruction error of every MatMul weight (relative change, median and best), and the mean error of
  each weight's largest 0.5% of values;
- perplexity of the whole model on the same 8 x 128 tokens as ``bench_llm.py``, refined vs not.

    python bench/bench_hqq.py [--model DIR/model.onnx] [--blocks 32,128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bench_llm  # noqa: E402
from graphopt.numerics import blocks  # noqa: E402

ITERATIONS, P_NORM, BETA, KAPPA = 20, 0.7, 10.0, 1.01  # HQQ's defaults (and ORT's)


def shrink(x: np.ndarray, beta: float) -> np.ndarray:
    """The proximal step of ``|x|^p / beta``: ``sign(x) * max(|x| - |x|^(p-1) / beta, 0)``."""
    magnitude = np.abs(x)
    with np.errstate(divide="ignore"):
        cut = np.power(magnitude, P_NORM - 1.0, where=magnitude > 0, out=np.full_like(magnitude, np.inf)) / beta
    return np.sign(x) * np.maximum(magnitude - cut, 0.0)


def refine(w: np.ndarray, grid: blocks.IntBlocks, scale_type: blocks.ScaleType) -> blocks.IntBlocks:
    """``grid`` with each block's integer zero point (asymmetric) or scale (symmetric) moved by HQQ's iteration."""
    k, n = w.shape
    size = grid.block_size
    qmin, qmax = blocks.int_levels(grid.bits, grid.symmetric)
    valid = (np.arange(grid.scales.shape[0] * size) < k).reshape(-1, size, 1).astype(np.float32)
    rows = valid.sum(axis=1)
    padded = blocks.padded_blocks(w, size)
    s = grid.scales.copy()
    z = None if grid.zero_points is None else grid.zero_points.astype(np.float32)
    q = blocks.padded_codes(grid.codes, size, 0).astype(np.float32)
    beta = BETA
    for _ in range(ITERATIONS):
        offset = 0.0 if z is None else z[:, None, :]
        target = padded - shrink(padded - (q - offset) * s[:, None, :], beta)
        if z is None:
            num, den = np.sum(target * q * valid, axis=1), np.sum(q * q * valid, axis=1)
            s = np.where(den > 0, num / np.where(den > 0, den, 1.0), s)
            if scale_type == "float16":
                s = s.astype(np.float16).astype(np.float32)
            s = np.where(s == 0, np.float32(1.0), s).astype(np.float32)
        else:
            z = np.clip(np.rint(np.sum((q - target / s[:, None, :]) * valid, axis=1) / rows), qmin, qmax)
        offset = 0.0 if z is None else z[:, None, :]
        q = np.clip(np.rint(padded / s[:, None, :] + offset), qmin, qmax)
        beta *= KAPPA
    codes = q.reshape(-1, n)[:k].astype(grid.codes.dtype)
    zeros = None if z is None else z.astype(np.uint8)
    return replace(grid, codes=codes, scales=s, zero_points=zeros)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=bench_llm.CACHE / "smollm2-135m-fp32-cpu" / "model.onnx")
    parser.add_argument("--blocks", default="32,128")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        print(f"{args.model}: not found; export it first with models/llm/export_smollm2.py", file=sys.stderr)
        return 2
    import json

    decoder = json.loads((args.model.parent / "genai_config.json").read_text())["model"]["decoder"]
    bench_llm.HEAD.update(kv_heads=int(decoder["num_key_value_heads"]), size=int(decoder["head_size"]))
    # The text first: importing the pipeline changes which stdlib members the docstring text walks (bench_llm.text),
    # and these must be bench_llm.py's own windows.
    texts = bench_llm.windows(args.model.parent, 8, 128)
    base, _, reference = bench_llm.evaluate(args.model, texts, None)

    import graphopt
    from graphopt.passes.weight_only import quantize as pass_module

    rows = []
    plain = pass_module.quantize_int_blocks
    for block in (int(b) for b in args.blocks.split(",")):
        for symmetric in (True, False):
            changes: list[float] = []
            largest: list[float] = []

            def refined(
                w: np.ndarray,
                bits: int,
                size: int,
                changes: list[float] = changes,
                largest: list[float] = largest,
                **kw: object,
            ) -> blocks.IntBlocks:
                w = np.asarray(w, np.float32)
                grid = plain(w, bits, size, **kw)
                better = refine(w, grid, kw.get("scale_type", "float32"))  # type: ignore[arg-type]
                old, new = np.abs(grid.dequantize() - w), np.abs(better.dequantize() - w)
                before = np.linalg.norm(old)
                changes.append(float(np.linalg.norm(new) / before - 1.0) if before else 0.0)
                big = np.abs(w) >= np.percentile(np.abs(w), 99.5)  # the weight's largest 0.5%
                largest.append(float(new[big].mean() / old[big].mean() - 1.0) if old[big].mean() else 0.0)
                return better

            result = {}
            for label, rounding in (("round to nearest", plain), ("+ HQQ-style refinement", refined)):
                pass_module.quantize_int_blocks = rounding
                try:
                    options = {"weight_only": {"block_size": block, "symmetric": symmetric}}
                    out = graphopt.optimize(args.model, {"passes": [options], "verify": {"enabled": False}})
                    with tempfile.TemporaryDirectory() as folder:
                        path = Path(folder) / "model.onnx"
                        graphopt.save(out.model, path, external_data=True)
                        result[label] = bench_llm.evaluate(path, texts, reference)[0]
                finally:
                    pass_module.quantize_int_blocks = plain
            kind = "symmetric" if symmetric else "asymmetric (integer zero points)"
            for label, ppl in result.items():
                error = big = ""
                if label != "round to nearest":
                    error = f"{np.median(changes):+.2%} median, {min(changes):+.2%} best"
                    big = f"{np.median(largest):+.2%} median"
                rows.append(f"| int4 b{block} {kind} | {label} | {ppl:.3f} | {ppl / base - 1:+.1%} | {error} | {big} |")
    print(f"fp32 perplexity {base:.3f} on 8 x 128 tokens of stdlib docstrings (bench_llm.py's windows)\n")
    print(
        "| weights | rounding | perplexity | vs fp32 | weight error vs round to nearest "
        "| mean error of each weight's largest 0.5% vs round to nearest |"
    )
    print("|---|---|---:|---:|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
