"""A save killed half-way leaves the previous output intact, and its leftovers are cleaned later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt import destinations, io

SAVER = """
import sys, graphopt
model = graphopt.load(sys.argv[1])
graphopt.save(model, sys.argv[2], external_data=True)
"""


def _big_model(path: Path) -> Path:
    weight = numpy_helper.from_array(np.ones((4096, 8192), np.float32), "W")  # 128 MiB: the save takes a while
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8192])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path), save_as_external_data=True, location="big.onnx.data")
    return path


def test_kill_during_save_keeps_previous_output(tmp_path: Path) -> None:
    source = _big_model(tmp_path / "big.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "model.onnx"
    output.write_bytes(b"previous output")
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(source), str(output)])
    deadline = time.monotonic() + 60
    # the marker is the first file of a save's temporary folder: once it is there, the save is under way
    while (
        not list(out_dir.glob(f".graphopt-*/{destinations.TEMP_MARKER}"))
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert output.read_bytes() == b"previous output"
    assert sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".graphopt-")) == ["model.onnx"]
    leftovers = list(out_dir.glob(".graphopt-*"))
    assert leftovers  # killed mid-save: its temporary folder is still there
    for folder in leftovers:  # age them past the staleness limit
        old = time.time() - io.STALE_TEMP_SECONDS - 60
        os.utime(folder, (old, old))
    io.save_model(io.load_model(source), out_dir / "next.onnx", external_data=True)
    assert not list(out_dir.glob(".graphopt-*"))
