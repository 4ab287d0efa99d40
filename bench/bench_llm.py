"""4-bit weight-only quantization of a real decoder LM, judged by perplexity and speed (issue 17's figures).

The model is SmolLM2-135M-Instruct exported by ONNX Runtime GenAI's builder (``models/llm/export_smollm2.py``:
fp32 and fp16, CPU, KV cache; the builder's own int4 export is an anchor). The text is public-domain prose
available offline: docstrings of Python standard-library modules, tokenized with the model's tokenizer and cut into
fixed windows; every variant sees the same tokens. Evaluation and calibration use different modules, so GPTQ never
sees the evaluation text. Each evaluation window runs as one prompt (past length 0): perplexity of its next tokens
and next-token top-1 agreement with the fp32 model.

Variants, in one run: graphopt ``weight_only`` (round to nearest, GPTQ with and without act-order, asymmetric,
NF4 with double quantization, int8) from the fp32 and the fp16 export; ONNX Runtime's ``MatMulNBitsQuantizer``
(RTN, HQQ and GPTQ) and the builder's int4 export. Per variant: perplexity, top-1, bits per MatMul weight (codes,
scales and zero points over K x N), files, prompt tokens/s (1 x 128 tokens) and decode tokens/s (1 token after a
128-token cache) timed in interleaved rounds on one thread, quantize wall time and peak RSS of the quantizing
process. Prints a Markdown table.

    python bench/bench_llm.py [--model DIR/model.onnx] [--windows 8] [--tokens 128] [--out FILE.json]

Caveat (issue 17): the weights come from a Q4_1 GGUF file, so each 32-value block holds at most 16 distinct
values; block 128 is the telling column.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("argparse", "collections", "json", "pathlib", "subprocess", "typing", "unittest", "logging", "decimal",
           "fractions", "heapq", "itertools", "functools", "textwrap", "threading", "zipfile")  # fmt: skip
CALIBRATION_MODULES = ("email", "http", "csv", "string", "re", "os", "shutil", "tarfile", "random", "statistics",
                       "datetime", "enum", "dataclasses", "contextlib", "abc", "ast")  # fmt: skip
CACHE = Path.home() / ".cache" / "graphopt" / "llm"


def text(modules: tuple[str, ...]) -> str:
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, member in inspect.getmembers(module):
            if (inspect.isclass(member) or inspect.isfunction(member)) and getattr(member, "__module__", "") == name:
                parts.append(inspect.getdoc(member) or "")
    return "\n\n".join(p for p in parts if p)


def windows(model_dir: Path, count: int, tokens: int, modules: tuple[str, ...] = MODULES) -> list[np.ndarray]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text(modules)).ids
    step = len(ids) // count
    return [np.asarray(ids[i * step : i * step + tokens], np.int64)[None, :] for i in range(count)]


HEAD: dict[str, int] = {}  # KV heads and head size, from the export's genai_config.json
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def feeds(session: object, window: np.ndarray, past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One step: ``window``'s tokens after ``past`` (the KV cache; None: empty), for either export's inputs."""
    batch, length = window.shape
    before = next(iter(past.values())).shape[2] if past else 0
    out: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():  # type: ignore[attr-defined]
        if spec.name == "input_ids":
            out[spec.name] = window
        elif spec.name == "attention_mask":
            out[spec.name] = np.ones((batch, before + length), np.int64)
        elif spec.name == "position_ids":
            out[spec.name] = np.arange(before, before + length, dtype=np.int64)[None].repeat(batch, 0)
        elif spec.name.startswith("past_key_values"):
            empty = np.zeros((batch, HEAD["kv_heads"], 0, HEAD["size"]), _DTYPES[spec.type])
            out[spec.name] = past[spec.name] if past else empty
    return out


def session(path: Path, threads: int, *, reuse: bool = True) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_mem_reuse = reuse
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def evaluate(path: Path, texts: list[np.ndarray], reference: list[np.ndarray] | None) -> tuple[float, float, list]:
    """Perplexity of the next tokens, top-1 agreement with ``reference``'s argmaxes, and this model's argmaxes."""
    run = session(path, 2)
    nll, count, agree, argmaxes = 0.0, 0, 0, []
    for i, window in enumerate(texts):
        logits = run.run(["logits"], feeds(run, window))[0][0].astype(np.float64)  # type: ignore[attr-defined]
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


def write_calibration(source: Path, folder: Path, count: int, tokens: int) -> Path:
    """``count`` windows of the calibration text as per-sample .npz files, with the inputs ``source`` takes."""
    folder.mkdir(parents=True, exist_ok=True)
    run = session(source, 1)
    for i, window in enumerate(windows(source.parent, count, tokens, CALIBRATION_MODULES)):
        np.savez(folder / f"{i:03d}.npz", **feeds(run, window))
    return folder


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def matmul_bits(path: Path) -> float:
    """Bits per MatMul weight: bytes of every constant a MatMulNBits/MatMulBnb4 reads besides A, over K x N."""
    import onnx_ir as ir

    graph = ir.load(str(path)).graph
    stored = params = 0
    for node in graph:
        if node.op_type not in ("MatMulNBits", "MatMulBnb4"):
            continue
        params += node.attributes.get_int("K") * node.attributes.get_int("N")
        seen: set[str] = set()
        todo = [v for v in node.inputs[1:] if v is not None]
        while todo:
            value = todo.pop()
            if value.name in seen:
                continue
            seen.add(value.name)
            if value.const_value is not None:
                stored += value.const_value.nbytes
            elif value.producer() is not None:  # scales behind a Cast, NF4's double-quantized absmax chain
                todo.extend(v for v in value.producer().inputs if v is not None)
    return 8 * stored / params if params else float("nan")


# A forked child starts with its parent's peak RSS (Linux keeps the high-water mark across fork and exec), and
# this process holds sessions: a small launcher process forks the quantizer and reports the quantizer's own peak.
_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=open(sys.argv[1], "w"))
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured(argv: list[str], limit: float) -> tuple[float, float]:
    """Run ``argv``; its wall time (s) and peak RSS (MB), or raise with the last line of its stderr (or on
    running past ``limit`` seconds)."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        start = time.perf_counter()
        launcher = [sys.executable, "-c", _LAUNCHER, log.name, *argv]
        child = subprocess.Popen(launcher, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, _ = child.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise RuntimeError(f"stopped after {limit:.0f} s (no result)") from None
        seconds = time.perf_counter() - start
        done = subprocess.CompletedProcess(launcher, child.returncode, out)
        if done.returncode:
            lines = [line for line in log.read().splitlines() if line.strip()]
            raise RuntimeError(lines[-1].strip() if lines else f"exit {done.returncode}")
    return seconds, int(done.stdout.split()[-1]) / 1024


@dataclass
class Variant:
    name: str
    source: str  # "fp32" or "fp16"
    tool: str  # "graphopt", "ort-rtn", "ort-hqq", "ort-gptq", "export"
    block: int = 0
    options: str = ""
    calibrated: bool = False

    def make(self, src: Path, dst: Path, calib: Path, limit: float) -> tuple[float, float]:
        if self.tool == "graphopt":
            argv = [sys.executable, "-m", "graphopt.cli", "optimize", str(src), "-o", str(dst), "--external-data"]
            argv += ["--pass", f"weight_only:block_size={self.block}{self.options}", "--no-verify"]
            return measured(argv + (["--calib", str(calib)] if self.calibrated else []), limit)
        argv = [sys.executable, __file__, "--make", self.tool, "--block", str(self.block), str(src), str(dst)]
        return measured(argv + (["--calib", str(calib)] if self.calibrated else []), limit)


def variants() -> list[Variant]:
    rows = []
    for block in (32, 128):
        rows.append(Variant(f"graphopt rtn, int4 b{block}", "fp32", "graphopt", block))
        rows.append(Variant(f"graphopt gptq, int4 b{block}", "fp32", "graphopt", block, ",method=gptq", True))
    rows += [
        Variant("graphopt rtn asymmetric, int4 b128", "fp32", "graphopt", 128, ",symmetric=false"),
        Variant(
            "graphopt gptq without act-order, int4 b128", "fp32", "graphopt", 128, ",method=gptq,act_order=false", True
        ),
        Variant("graphopt gptq asymmetric, int4 b128", "fp32", "graphopt", 128, ",method=gptq,symmetric=false", True),
        Variant(
            "graphopt gptq, int4 b32, accuracy_level 4", "fp32", "graphopt", 32, ",method=gptq,accuracy_level=4", True
        ),
        Variant("graphopt rtn, nf4 b64 + double quant", "fp32", "graphopt", 64, ",format=nf4"),
        Variant("graphopt gptq, nf4 b64 + double quant", "fp32", "graphopt", 64, ",format=nf4,method=gptq", True),
        Variant("graphopt rtn, int8 b32", "fp32", "graphopt", 32, ",bits=8"),
        Variant("graphopt gptq tied=true, int4 b32", "fp32", "graphopt", 32, ",method=gptq,tied=true", True),
        Variant(
            "graphopt gptq tied=true embedding_bits=8, int4 b32",
            "fp32",
            "graphopt",
            32,
            ",method=gptq,tied=true,embedding_bits=8",
            True,
        ),
    ]
    # mixed precision: a share of the MatMul parameters at 8 bits, the layers that lose most at 4 bits per parameter
    rows.append(Variant("graphopt rtn mixed_share=0.25, int4 b128", "fp32", "graphopt", 128, ",mixed_share=0.25"))
    for share in (0.1, 0.25):
        for block in (32, 128):
            name = f"graphopt gptq mixed_share={share}, int4 b{block}"
            rows.append(Variant(name, "fp32", "graphopt", block, f",method=gptq,mixed_share={share}", True))
    # AWQ: activation-aware row scales folded into the norms and gated products, then rounding
    for method in ("rtn", "gptq"):
        for block in (32, 128):
            name = f"graphopt {method} awq, int4 b{block}"
            rows.append(Variant(name, "fp32", "graphopt", block, f",method={method},awq=true", True))
    # decode speed: the LM head quantized too (tied) and int8 activations in the kernel, as ORT GenAI's builder does
    for options in ("tied=true", "tied=true,embedding_bits=8", "tied=true,mixed_share=0.1"):
        name = f"graphopt gptq {options.replace(',', ' ')}, int4 b32, accuracy_level 4"
        rows.append(Variant(name, "fp32", "graphopt", 32, f",method=gptq,{options},accuracy_level=4", True))
    for block in (32, 128):
        rows.append(Variant(f"ORT MatMulNBitsQuantizer rtn, int4 b{block}", "fp32", "ort-rtn", block))
        rows.append(Variant(f"ORT MatMulNBitsQuantizer hqq, int4 b{block}", "fp32", "ort-hqq", block))
        rows.append(Variant(f"ORT MatMulNBitsQuantizer gptq, int4 b{block}", "fp32", "ort-gptq", block, "", True))
    rows.append(Variant("ORT GenAI builder -p int4 (its default)", "int4", "export", 32))
    rows += [
        Variant("fp16 (builder export)", "fp16", "export"),
        Variant("graphopt rtn from fp16, int4 b32", "fp16", "graphopt", 32),
        Variant("graphopt gptq from fp16, int4 b128", "fp16", "graphopt", 128, ",method=gptq", True),
    ]
    return rows


class _Reader:
    """ORT's CalibrationDataReader over a folder of per-sample .npz files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self.paths, None)
        return None if path is None else dict(np.load(path))

    def rewind(self) -> None:
        self.paths = iter(sorted(self.folder.glob("*.npz")))


def make_ort(tool: str, block: int, src: Path, dst: Path, calib: Path | None) -> None:
    """ONNX Runtime's MatMulNBitsQuantizer in one of its algorithms (run as a child process: --make)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    reader = type("Reader", (_Reader, CalibrationDataReader), {})
    configs = {
        "ort-rtn": lambda: None,  # the quantizer's default: RTN (asymmetric as below)
        "ort-hqq": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=4),
        "ort-gptq": lambda: nbits.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=reader(calib), block_size=block, actorder=True
        ),
    }
    model = onnx.load(str(src))
    quantizer = nbits.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=False, algo_config=configs[tool]())
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)


def timings(paths: dict[str, Path], rounds: int, decode_steps: int = 5) -> dict[str, tuple[float, float, str]]:
    """Prompt and decode tokens/s per model (1 thread), timed in interleaved rounds (medians), and a note.

    A model whose decode step ORT's memory planner refuses (the fp16 export's shape annotations make it reuse a
    prompt-sized buffer for one token) is timed with memory reuse off, and the note says so."""
    window = windows(next(iter(paths.values())).parent, 1, 128)[0]
    runs, steps, notes = {}, {}, {}
    for name, path in paths.items():  # warm-up, and the 128-token cache each decode step reads
        for reuse in (True, False):
            run = session(path, 1, reuse=reuse)
            names = [o.name for o in run.get_outputs()]  # type: ignore[attr-defined]
            outputs = dict(zip(names, run.run(names, feeds(run, window)), strict=True))  # type: ignore[attr-defined]
            past = {k.replace("present", "past_key_values"): v for k, v in outputs.items() if k.startswith("present")}
            token = outputs["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
            try:
                run.run(["logits"], feeds(run, token, past))  # type: ignore[attr-defined]
            except Exception as error:  # ORT raises its own Fail type
                if not reuse:
                    raise
                notes[name] = f"memory reuse off: with it, ORT fails the decode step ({str(error)[:60]}...)"
                continue
            runs[name], steps[name] = run, feeds(run, token, past)
            break
    prompt: dict[str, list[float]] = {name: [] for name in runs}
    decode: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run.run(["logits"], feeds(run, window))  # type: ignore[attr-defined]
            prompt[name].append(time.perf_counter() - start)
            for _ in range(decode_steps):
                start = time.perf_counter()
                run.run(["logits"], steps[name])  # type: ignore[attr-defined]
                decode[name].append(time.perf_counter() - start)
    return {
        name: (
            window.shape[1] / float(np.median(prompt[name])),
            1 / float(np.median(decode[name])),
            notes.get(name, ""),
        )
        for name in runs
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2-135m-fp32-cpu" / "model.onnx")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--limit", type=float, default=900, help="seconds a quantizer may run")
    parser.add_argument("--only", help="run the variants whose name contains this text (and fp32)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--work", type=Path, help="keep the quantized models here; a rerun reuses them and their rows")
    parser.add_argument("--make", help=argparse.SUPPRESS)
    parser.add_argument("--block", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--calib", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make:
        make_ort(args.make, args.block, args.paths[0], args.paths[1], args.calib)
        return 0
    if not args.model.is_file():
        print(f"{args.model}: not found; export it first with models/llm/export_smollm2.py", file=sys.stderr)
        return 2
    decoder = json.loads((args.model.parent / "genai_config.json").read_text())["model"]["decoder"]
    HEAD.update(kv_heads=int(decoder["num_key_value_heads"]), size=int(decoder["head_size"]))
    exports = {p: args.model.parent.parent / args.model.parent.name.replace("fp32", p) / "model.onnx"
               for p in ("fp32", "fp16", "int4")}  # fmt: skip
    texts = windows(args.model.parent, args.windows, args.tokens)
    base_ppl, _, reference = evaluate(args.model, texts, None)
    rows = [{"variant": "fp32 (builder export)", "ppl": base_ppl, "top1": 1.0, "bytes": size(args.model),
             "bits": 32.0, "s": None, "rss": None, "error": None}]  # fmt: skip
    paths = {rows[0]["variant"]: args.model}
    chosen = [v for v in variants() if not args.only or args.only in v.name]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(args.work or scratch)
        calib: dict[str, Path] = {}
        for v in chosen:
            src = exports[v.source]
            if not src.is_file():
                rows.append({"variant": v.name, "error": f"{src} not found: run models/llm/export_smollm2.py"})
                continue
            row: dict[str, object] = {"variant": v.name, "s": None, "rss": None, "error": None}
            dst = src
            folder = Path(tmp) / v.name.replace(" ", "-").replace(",", "")
            if (folder / "row.json").is_file():  # --work: made and measured by an earlier run
                row = json.loads((folder / "row.json").read_text())
                rows.append(row)
                if not row.get("error"):
                    paths[v.name] = Path(row["path"])  # type: ignore[arg-type]
                print(f"{v.name}: from {folder}", file=sys.stderr, flush=True)
                continue
            if v.tool != "export":
                if v.calibrated and v.source not in calib:
                    where = Path(tmp) / f"calib-{v.source}"
                    calib[v.source] = write_calibration(src, where, args.calib_windows, args.tokens)
                dst = folder / "model.onnx"
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                try:
                    row["s"], row["rss"] = v.make(src, dst, calib.get(v.source, Path(tmp)), args.limit)
                except RuntimeError as error:
                    row["error"] = str(error)[:160]
                    rows.append(row)
                    (folder / "row.json").write_text(json.dumps(row))
                    print(f"{v.name}: failed: {row['error']}", file=sys.stderr, flush=True)
                    continue
            row["ppl"], row["top1"], _ = evaluate(dst, texts, reference)
            row["bytes"] = size(dst)
            row["bits"] = 16.0 if v.name.startswith("fp16") else matmul_bits(dst)
            row["path"] = str(dst)
            paths[v.name] = dst
            rows.append(row)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "row.json").write_text(json.dumps(row))
            print(f"{v.name}: ppl {row['ppl']:.3f}", file=sys.stderr, flush=True)
        speed = timings(paths, args.rounds)
    for row in rows:
        if row["variant"] in speed:
            row["prompt_tps"], row["decode_tps"], row["note"] = speed[row["variant"]]  # type: ignore[index]
    print(report(rows, base_ppl, args))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


def report(rows: list[dict[str, object]], base_ppl: float, args: argparse.Namespace) -> str:
    lines = [
        f"{args.windows} windows x {args.tokens} tokens of stdlib docstrings; fp32 perplexity {base_ppl:.3f}; "
        f"GPTQ calibrated on {args.calib_windows} other windows; tokens/s on 1 thread, median of {args.rounds} "
        "interleaved rounds\n",
        "| variant | perplexity | vs fp32 | top-1 vs fp32 | bits/weight (MatMul) | files MB | prompt tok/s "
        "| decode tok/s | quantize s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def num(value: object, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['variant']} | failed: {r['error']} |" + " |" * 8)
            continue
        ppl = float(r["ppl"])  # type: ignore[arg-type]
        lines.append(
            f"| {r['variant']} | {ppl:.3f} | {ppl / base_ppl - 1:+.1%} | {float(r['top1']):.3f} "  # type: ignore[arg-type]
            f"| {num(r['bits'], '.2f')} | {int(r['bytes']) / 1e6:.1f} | {num(r.get('prompt_tps'), '.0f')} "  # type: ignore[call-overload]
            f"| {num(r.get('decode_tps'), '.1f')} | {num(r['s'], '.1f')} | {num(r['rss'], '.0f')} |"
        )
    notes = [f"- {r['variant']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + (["", *notes] if notes else []))


if __name__ == "__main__":
    sys.exit(main())
