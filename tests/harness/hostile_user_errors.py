"""User mistakes through the graphopt CLI: each must be a clean exit-2 error, never a traceback.

Where :mod:`tests.harness.hostile_files` feeds hostile model files, these are the ordinary
mistakes of a user: broken or unfitting data files, recipes and flags out of range, models
graphopt cannot feed or ONNX Runtime cannot run, broken LoRA adapters, and two models that
cannot be compared. Each case writes its files under a folder and returns the CLI arguments.
``python bench/hostile_files.py`` runs them with the hostile files, class by class.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.harness.hostile_files import Case


def _save(folder: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    model.ir_version = 10
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def linear_model(folder: Path, *, inputs: tuple[str, ...] = ("x",)) -> Path:
    """y = sum of inputs @ W: every input float [batch, 4]."""
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    nodes = [helper.make_node("MatMul", [inputs[0], "W"], ["h0"])]
    for i, name in enumerate(inputs[1:], 1):
        nodes.append(helper.make_node("Add", [f"h{i - 1}", name], [f"h{i}"]))
    nodes.append(helper.make_node("Identity", [f"h{len(inputs) - 1}"], ["y"]))
    specs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in inputs]
    graph = helper.make_graph(
        nodes, "g", specs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w]
    )
    return _save(folder, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _embedding(folder: Path) -> Path:
    """y = table[ids]: int64 ids [batch, 3] into a 10-row table, summed to [batch, 4]."""
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("ReduceSum", ["e", "axes"], ["y"], keepdims=0),
    ]
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [table, axes],
    )
    return _save(folder, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _optimize(model: Path, folder: Path, *extra: str) -> list[str]:
    return ["optimize", str(model), "-o", str(folder / "out" / "out.onnx"), *extra]


# ---- data files -----------------------------------------------------------------------------


def _with_data(make: Callable[[Path], Path], flag: str = "--verify-data") -> Callable[[Path], list[str]]:
    """A case: the linear model fed ``make(folder)`` as verification (or calibration) data."""

    def case(folder: Path) -> list[str]:
        data = make(folder)
        passes = ("--pass", "quantize") if flag == "--calib" else ()
        return _optimize(linear_model(folder), folder, *passes, flag, str(data))

    return case


def _text(folder: Path) -> Path:
    (folder / "notes.txt").write_text("x,y\n1,2\n")
    return folder / "notes.txt"


def _text_folder(folder: Path) -> Path:
    (folder / "d").mkdir()
    _text(folder / "d")
    return folder / "d"


def _npz(folder: Path, **arrays: np.ndarray) -> Path:
    np.savez(folder / "d.npz", **arrays)
    return folder / "d.npz"


def _npy_folder(folder: Path, **arrays: np.ndarray) -> Path:
    (folder / "d").mkdir()
    for name, array in arrays.items():
        np.save(folder / "d" / f"{name}.npy", array)
    return folder / "d"


def _good_x(samples: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((samples, 4)).astype(np.float32)


def _truncated_npz(folder: Path) -> Path:
    path = _npz(folder, x=_good_x(64))
    path.write_bytes(path.read_bytes()[:300])
    return path


def _bad_crc_npz(folder: Path) -> Path:
    path = _npz(folder, x=_good_x(64))
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0xFF  # inside the stored (uncompressed) array bytes
    path.write_bytes(bytes(raw))
    return path


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _huge_npy(folder: Path) -> Path:
    (folder / "d").mkdir()
    (folder / "d" / "x.npy").write_bytes(_npy_header((1 << 40, 4)) + b"\0" * 64)
    return folder / "d"


def _huge_npz(folder: Path) -> Path:
    with zipfile.ZipFile(folder / "d.npz", "w") as archive:
        archive.writestr("x.npy", _npy_header((1 << 40, 4)) + b"\0" * 64)
    return folder / "d.npz"


def _short_npy(folder: Path) -> Path:
    (folder / "d").mkdir()
    (folder / "d" / "x.npy").write_bytes(_npy_header((100, 4)) + b"\0" * 64)
    return folder / "d"


def _lone_npy_two_inputs(folder: Path) -> list[str]:
    np.save(folder / "x.npy", _good_x())
    return _optimize(linear_model(folder, inputs=("x", "z")), folder, "--verify-data", str(folder / "x.npy"))


def _ids(folder: Path, ids: np.ndarray) -> list[str]:
    return _optimize(_embedding(folder), folder, "--verify-data", str(_npz(folder, ids=ids)))


def _nan_sample(folder: Path) -> Path:
    x = _good_x()
    x[2, 1] = np.nan
    return _npz(folder, x=x)


def _inf_sample(folder: Path) -> Path:
    x = _good_x()
    x[3, 0] = -np.inf
    return _npy_folder(folder, x=x)


DATA_CASES: tuple[Case, ...] = (
    Case("truncated .npz", _with_data(_truncated_npz)),
    Case(".npz with a bad CRC", _with_data(_bad_crc_npz)),
    Case(".npy header declaring a huge array", _with_data(_huge_npy)),
    Case(".npz member declaring a huge array", _with_data(_huge_npz, "--calib")),
    Case(".npy shorter than its header says", _with_data(_short_npy)),
    Case("0-d array", _with_data(lambda f: _npz(f, x=np.array(1.0, np.float32)))),
    Case("unicode array", _with_data(lambda f: _npz(f, x=np.array([["a"] * 4] * 2)))),
    Case("complex array", _with_data(lambda f: _npz(f, x=_good_x() + 1j))),
    Case("wrong inner dimension", _with_data(lambda f: _npz(f, x=np.zeros((4, 5), np.float32)))),
    Case("wrong inner dimension as calibration", _with_data(lambda f: _npz(f, x=np.zeros((4, 7))), "--calib")),
    Case("zero samples", _with_data(lambda f: _npz(f, x=np.zeros((0, 4), np.float32)))),
    Case("token ids past the table", lambda f: _ids(f, np.full((2, 3), 99, np.int64))),
    Case("token ids below the table", lambda f: _ids(f, np.full((2, 3), -50, np.int64))),
    Case("fractional token ids", lambda f: _ids(f, np.full((2, 3), 1.5))),
    Case("lone .npy for a two-input model", _lone_npy_two_inputs),
    Case("NaN in the data", _with_data(_nan_sample)),
    Case("Inf in the calibration data", _with_data(_inf_sample, "--calib")),
    Case("text file as .npz", _with_data(lambda f: (f / "d.npz").write_text("x,y\n1,2\n") and f / "d.npz")),
    Case("an empty folder as data", _with_data(lambda f: (f / "d").mkdir() or f / "d")),
    Case("a folder without .npy files as data", _with_data(_text_folder)),
    Case("the model itself as calibration data", lambda f: _optimize(linear_model(f), f, "--calib", str(f / "m.onnx"))),
    Case("a text file as bench data", lambda f: ["bench", str(linear_model(f)), "--data", str(_text(f))]),
)


# ---- recipes and flags -----------------------------------------------------------------------


def _recipe(text: str | bytes, suffix: str = ".yaml") -> Callable[[Path], list[str]]:
    def case(folder: Path) -> list[str]:
        path = folder / f"r{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return _optimize(linear_model(folder), folder, "--recipe", str(path))

    return case


def _flags(*flags: str, command: str = "optimize") -> Callable[[Path], list[str]]:
    def case(folder: Path) -> list[str]:
        model = linear_model(folder)
        if command == "optimize":
            return _optimize(model, folder, *flags)
        if command == "verify":
            return ["verify", str(model), str(model), *flags]
        return [command, str(model), *flags]

    return case


RECIPE_CASES: tuple[Case, ...] = (
    Case("deeply nested YAML recipe", _recipe("passes: " + "[" * 5000 + "]" * 5000 + "\n")),
    Case("deeply nested JSON recipe", _recipe('{"passes": ' + "[" * 100000 + "]" * 100000 + "}", ".json")),
    Case("non-UTF-8 recipe", _recipe(b"passes: [fold]\n# caf\xe9\n")),
    Case("recipe that is a list", _recipe("- fold\n")),
    Case("verify batch_size 0", _recipe("passes: [fold]\nverify: {batch_size: 0}\n")),
    Case("verify samples negative", _recipe("passes: [fold]\nverify: {samples: -3}\n")),
    Case("calibration samples 0", _recipe("passes: [fold]\ncalibration: {samples: 0}\n")),
    Case("latency_runs negative", _recipe("passes: [fold]\nverify: {latency_runs: -1}\n")),
    Case("verify dims 0", _recipe("passes: [fold]\nverify: {dims: {batch: 0}}\n")),
    Case("budget min_cosine 5", _recipe("passes: [fold]\nbudget: {min_cosine: 5}\n")),
    Case("budget max_abs NaN", _recipe("passes: [fold]\nbudget: {max_abs: .nan}\n")),
    Case("budget max_rel_l2 negative", _recipe("passes: [fold]\nbudget: {max_rel_l2: -0.1}\n")),
    Case("budget min_top1 infinite", _recipe("passes: [fold]\nbudget: {min_top1: .inf}\n")),
    Case("budget for an unknown output", _recipe("passes: [fold]\nbudget: {max_abs: 1, outputs: [nope]}\n")),
    Case("fallback max_float_nodes negative", _recipe("passes: [fold]\nfallback: {max_float_nodes: -1}\n")),
    Case("--pass with an unclosed list", _flags("--pass", "quantize:ops=[Conv")),
    Case("--pass with a python tag", _flags("--pass", "quantize:ops=!!python/object/apply:os.getcwd []")),
    Case("--pass with a YAML tab", _flags("--pass", "fold:iterations=\t1: 2")),
    Case("--dim batch=0", _flags("--dim", "batch=0")),
    Case("--samples 0", _flags("--samples", "0")),
    Case("--threads -2", _flags("--threads", "-2")),
    Case("bench --runs 0", _flags("--runs", "0", command="bench")),
    Case("bench --batch-size 0", _flags("--batch-size", "0", command="bench")),
    Case("bench --warmup -1", _flags("--warmup", "-1", command="bench")),
    Case("verify --min-cosine 5", _flags("--min-cosine", "5", command="verify")),
    Case("verify --max-abs nan", _flags("--max-abs", "nan", command="verify")),
    Case("verify --samples -1", _flags("--samples", "-1", command="verify")),
    Case("--dim without a value", _flags("--dim", "batch")),
    Case("--dim the model does not have", _flags("--dim", "sequence=8")),
    Case("--recipe that does not exist", lambda f: _optimize(linear_model(f), f, "--recipe", str(f / "nope.yaml"))),
    Case("--recipe that is a folder", lambda f: _optimize(linear_model(f), f, "--recipe", str(f / "out"))),
    Case("--pass naming no pass", _flags("--pass", "quantise")),
    Case("--pass with an unknown option", _flags("--pass", "quantize:per_chanel=false")),
    Case("--pass with a bool option given a word", _flags("--pass", "quantize:per_channel=maybe")),
    Case("--pass with a value outside its choices", _flags("--pass", "quantize:method=best")),
    Case("--pass fold with no iterations", _flags("--pass", "fold:iterations=0")),
    Case("--pass weight_only with 3 bits", _flags("--pass", "weight_only:bits=3")),
    Case("--pass prune with sparsity 1.5", _flags("--pass", "prune:sparsity=1.5")),
)


# ---- models ---------------------------------------------------------------------------------


def _graph_model(
    nodes: list[onnx.NodeProto], inputs: list, outputs: list, inits: list = (), **kw: object
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), *kw.get("opsets", [])])


_X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
_Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])


def scalar_input_model(folder: Path) -> Path:
    """y = x * s with a rank-0 input s."""
    scale = helper.make_tensor_value_info("s", TensorProto.FLOAT, [])
    return _save(folder, _graph_model([helper.make_node("Mul", ["x", "s"], ["y"])], [_X, scale], [_Y]))


def _scalar_input_with_rows(folder: Path) -> list[str]:
    data = _npz(folder, x=_good_x(), s=np.ones(4, np.float32))
    return _optimize(scalar_input_model(folder), folder, "--verify-data", str(data))


def unsorted_model(folder: Path) -> Path:
    """Relu before the Neg that feeds it: ONNX Runtime accepts it, onnx.checker does not."""
    nodes = [helper.make_node("Relu", ["h"], ["y"]), helper.make_node("Neg", ["x"], ["h"])]
    return _save(folder, _graph_model(nodes, [_X], [_Y]))


def _custom_op(domain: str, op: str = "FancyGelu") -> Callable[[Path], list[str]]:
    def case(folder: Path) -> list[str]:
        opsets = [helper.make_opsetid(domain, 1)] if domain else []
        model = _graph_model([helper.make_node(op, ["x"], ["y"], domain=domain)], [_X], [_Y], opsets=opsets)
        return _optimize(_save(folder, model), folder)

    return case


def _undefined_input(folder: Path) -> list[str]:
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"])]
    return _optimize(_save(folder, _graph_model(nodes, [_X], [_Y])), folder)


def _two_producers(folder: Path) -> list[str]:
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])]
    return _optimize(_save(folder, _graph_model(nodes, [_X], [_Y])), folder)


def _sequence_input(folder: Path) -> list[str]:
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    nodes = [helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=0)]
    return _optimize(_save(folder, _graph_model(nodes, [seq], [_Y])), folder)


def _adapter_model(folder: Path) -> Path:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "fc.weight_t")
    node = helper.make_node("MatMul", ["x", "fc.weight_t"], ["y"], name="/fc/MatMul")
    return _save(folder, _graph_model([node], [_X], [_Y], [w]))


def _safetensors(header: object, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _adapter(weights: bytes, config: object = None) -> Callable[[Path], list[str]]:
    def case(folder: Path) -> list[str]:
        adapter = folder / "adapter"
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_bytes(weights)
        settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 4} if config is None else config
        (adapter / "adapter_config.json").write_text(json.dumps(settings))
        return _optimize(_adapter_model(folder), folder, "--pass", f"merge_lora:adapters=[{adapter}]")

    return case


def _bf16(shape: list[int], offsets: list[int]) -> dict[str, object]:
    return {"dtype": "BF16", "shape": shape, "data_offsets": offsets}


_A, _B = "base_model.model.fc.lora_A.weight", "base_model.model.fc.lora_B.weight"
_GOOD_BF16 = {_A: _bf16([2, 4], [0, 16]), _B: _bf16([4, 2], [16, 32])}

MODEL_CASES: tuple[Case, ...] = (
    Case("rank-0 input fed per-sample data", _scalar_input_with_rows),
    Case("sequence input", _sequence_input),
    Case("unknown custom op", _custom_op("com.example")),
    Case("unknown op in the default domain", _custom_op("", "FancyGelu")),
    Case("unknown op in ORT's own domain", _custom_op("com.microsoft", "NoSuchContribOp")),
    Case("node reading an undefined value", _undefined_input),
    Case("value with two producers", _two_producers),
    Case("adapter with truncated tensors", _adapter(_safetensors(_GOOD_BF16, b"\0" * 20))),
    Case("adapter header that is a list", _adapter(_safetensors([1, 2], b""))),
    Case("adapter header entry without shape", _adapter(_safetensors({_A: {"dtype": "BF16"}}, b"\0" * 16))),
    Case(
        "adapter with a non-float tensor",
        _adapter(
            _safetensors(
                {_A: {"dtype": "I32", "shape": [2, 4], "data_offsets": [0, 32]}, _B: _bf16([4, 2], [32, 48])},
                b"\0" * 48,
            )
        ),
    ),
    Case(
        "adapter whose factors do not fit the weight",
        _adapter(_safetensors({_A: _bf16([2, 3], [0, 12]), _B: _bf16([4, 2], [12, 28])}, b"\0" * 28)),
    ),
    Case("adapter config that is a list", _adapter(_safetensors(_GOOD_BF16, b"\0" * 32), config=[1])),
)


# ---- verify ---------------------------------------------------------------------------------


def _verify_pair(folder: Path, reference: Path, candidate: Path) -> list[str]:
    return ["verify", str(reference), str(candidate)]


def _renamed_input(folder: Path) -> list[str]:
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    return _verify_pair(folder, linear_model(folder / "a"), linear_model(folder / "b", inputs=("z",)))


def _extra_input(folder: Path) -> list[str]:
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    return _verify_pair(folder, linear_model(folder / "a"), linear_model(folder / "b", inputs=("x", "z")))


def _other_dtype(folder: Path) -> list[str]:
    (folder / "a").mkdir()
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 4])
    candidate = _save(folder, _graph_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y]), "c.onnx")
    return _verify_pair(folder, linear_model(folder / "a"), candidate)


def _other_shape(folder: Path) -> list[str]:
    (folder / "a").mkdir()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])
    candidate = _save(folder, _graph_model([helper.make_node("Relu", ["x"], ["y"])], [x], [_Y]), "c.onnx")
    return _verify_pair(folder, linear_model(folder / "a"), candidate)


VERIFY_CASES: tuple[Case, ...] = (
    Case("verify: renamed input", _renamed_input),
    Case("verify: extra candidate input", _extra_input),
    Case("verify: input of another dtype", _other_dtype),
    Case("verify: input of another shape", _other_shape),
    Case("verify against a text file", lambda f: ["verify", str(linear_model(f)), str(_text(f))]),
    Case("inspect a text file", lambda f: ["inspect", str(_text(f))]),
)

CLASSES: dict[str, tuple[Case, ...]] = {
    "data files": DATA_CASES,
    "recipes and flags": RECIPE_CASES,
    "models graphopt cannot feed or run, broken adapters": MODEL_CASES,
    "verify of models that differ": VERIFY_CASES,
}
CASES: tuple[Case, ...] = DATA_CASES + RECIPE_CASES + MODEL_CASES + VERIFY_CASES
