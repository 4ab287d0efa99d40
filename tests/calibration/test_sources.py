"""Generated inputs (graphopt/calibration/sources.py)."""

from __future__ import annotations

import numpy as np

from graphopt.calibration.sources import DataSpec, InputSpec, iter_batches


def test_generated_inputs_of_a_kv_cache_decoder_add_up() -> None:
    """Past length 0 and an attention mask as long as the new tokens, unless --dim says otherwise."""
    specs = [
        InputSpec("input_ids", np.dtype(np.int64), ("batch_size", "sequence_length")),
        InputSpec("attention_mask", np.dtype(np.int64), ("batch_size", "total_sequence_length")),
        InputSpec("past_key_values.0.key", np.dtype(np.float32), ("batch_size", 3, "past_sequence_length", 64)),
        InputSpec("past_key_values.0.value", np.dtype(np.float32), ("batch_size", 3, "past_sequence_length", 64)),
    ]
    (batch,) = list(iter_batches(DataSpec(samples=1, dims={"sequence_length": 8}), specs))
    assert batch["input_ids"].shape == (1, 8) and batch["attention_mask"].shape == (1, 8)
    assert batch["past_key_values.0.key"].shape == (1, 3, 0, 64)
    dims = {"sequence_length": 1, "past_sequence_length": 5}
    (batch,) = list(iter_batches(DataSpec(samples=1, dims=dims), specs))
    assert batch["attention_mask"].shape == (1, 6) and batch["past_key_values.0.value"].shape == (1, 3, 5, 64)
    # a model without a cache keeps the usual default
    (batch,) = list(iter_batches(DataSpec(samples=1), specs[:2]))
    assert batch["attention_mask"].shape == (1, 32)


def test_a_symbolic_kv_head_size_is_read_off_group_query_attention() -> None:
    """ORT GenAI's exports name the head size (kv_cache_dim); GroupQueryAttention's packed query says it is 64."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from graphopt.calibration.sources import input_specs

    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["b", 3, "past", "kv_cache_dim"])
    past_v = helper.make_tensor_value_info(
        "past_key_values.0.value", TensorProto.FLOAT, ["b", 3, "past", "kv_cache_dim"]
    )
    qkv = helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["b", "s", 960])  # (9 + 2 * 3) heads x 64
    gqa = helper.make_node(
        "GroupQueryAttention", ["qkv", "", "", "past_key_values.0.key", "past_key_values.0.value", "seqlens", "total"],
        ["out", "present.0.key", "present.0.value"], domain="com.microsoft", num_heads=9, kv_num_heads=3,
    )  # fmt: skip
    graph = helper.make_graph(
        [gqa], "g", [qkv, past, past_v, helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["b"]),
                     helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    specs = {s.name: s for s in input_specs(ir.serde.deserialize_model(model))}
    assert specs["past_key_values.0.key"].hints == (("kv_cache_dim", 64),)
    assert specs["past_key_values.0.value"].shape == ("b", 3, "past", "kv_cache_dim")  # --dim can still set it
    kv = [specs["past_key_values.0.key"], specs["past_key_values.0.value"]]
    (batch,) = list(iter_batches(DataSpec(samples=1), kv))
    assert batch["past_key_values.0.key"].shape == (1, 3, 0, 64)
    (batch,) = list(iter_batches(DataSpec(samples=1, dims={"kv_cache_dim": 16, "past": 2}), kv))
    assert batch["past_key_values.0.value"].shape == (1, 3, 2, 16)
