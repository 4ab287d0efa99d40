"""``graphopt demo``: the default recipe on the bundled digits CNN, with real test accuracy.

The CNN was trained on scikit-learn's digits and exported by ``models/build_bundled.py``;
it ships inside the package so the demo needs neither torch nor the network.
"""

from __future__ import annotations

import dataclasses
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
from rich.console import Console

from graphopt import destinations, io, recipe, render, verify
from graphopt.budget import Budget
from graphopt.calibration.sources import DEFAULT_CALIBRATION_SAMPLES, DataSpec
from graphopt.pipeline import optimize


def _data_file(name: str) -> Path:
    return Path(str(resources.files("graphopt") / "data" / name))


def run_demo(console: Console, out_dir: Path | None = None) -> int:
    """Optimize the bundled model with the default recipe, save it, print the report and test accuracy."""
    model_path = _data_file("digits_cnn.onnx")
    with np.load(_data_file("digits_test.npz")) as data:
        images, labels = data["input"], data["labels"]
    if out_dir is not None:  # --out must not clash with the bundled files the demo reads, and must be writable
        bundled = ("digits_cnn.onnx", "digits_test.npz", "digits_calib.npz", "../recipes/default.yaml")
        written = ("verify.npz", "digits_cnn.opt.onnx", "digits_cnn.opt.onnx.data")
        destinations.check_destinations(
            [destinations.Destination(f"--out's {name}", out_dir / name, creates_folder=True) for name in written],
            destinations.protected_files(("the bundled file", _data_file(name)) for name in bundled),
        )
    with tempfile.TemporaryDirectory() as tmp:
        folder = out_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        verify_data = folder / "verify.npz"
        np.savez(verify_data, input=images[:64])
        base = recipe.load_recipe(_data_file("../recipes/default.yaml"))
        plan = dataclasses.replace(
            base,
            verify=dataclasses.replace(base.verify, data=DataSpec(source=str(verify_data), samples=64, batch_size=64)),
            budget=Budget(min_top1=0.98),
        )
        calibration = DataSpec(
            source=str(_data_file("digits_calib.npz")), samples=DEFAULT_CALIBRATION_SAMPLES, batch_size=32
        )
        console.print(
            f"[bold]graphopt demo[/bold]: default recipe {[s.name for s in plan.passes]} on {model_path.name}"
        )
        result = optimize(model_path, plan, calibration=calibration)
        saved = io.save_model(result.model, folder / "digits_cnn.opt.onnx", protect=[model_path])
        result.report.output_path, result.report.output_bytes_on_disk = str(saved.path), saved.bytes_on_disk
        render.render_report(console, result.report)
        before = verify.label_accuracy(io.load_model(model_path), {"input": images}, labels)
        after = verify.label_accuracy(result.model, {"input": images}, labels)
        size = model_path.stat().st_size
        console.print(f"file size: {size:,} B → {saved.bytes_on_disk:,} B ({saved.bytes_on_disk / size:.1%})")
        console.print(f"digits test accuracy ({len(labels)} images): {before:.2%} → {after:.2%}")
        console.print(f"wrote {saved.path}" if out_dir else "(output discarded; use --out DIR to keep it)")
    return 0
