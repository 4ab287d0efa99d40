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
