"""The decode-cost model: its features by hand, the non-negative fit, and the recovery of known
coefficients from synthetic measurements. (Its accuracy on real measurements is a benchmark:
benchmarks/cost_model.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from asft_ray.errors import AsftError
from asft_ray.eval.cost_model import FEATURES, CostModel, DecoderShape, Measurement, features, fit, nnls

SMOL = DecoderShape(hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=30, vocab=49152)


def shapes() -> list[DecoderShape]:
    """Varied Llama shapes, each float and int8."""
    base = [(256, 768, 4, 2, 4, 8192), (512, 1536, 8, 4, 8, 16384), (576, 1536, 9, 3, 12, 49152),
            (768, 2048, 12, 4, 6, 32000), (384, 1024, 6, 2, 16, 8192), (1024, 2816, 16, 4, 4, 32000)]
    return [DecoderShape(*s, int8=q) for s in base for q in (False, True)]


def test_features_by_hand():
    tiny = DecoderShape(hidden=8, intermediate=16, heads=2, kv_heads=1, layers=3, vocab=10)  # head_dim 4
    # per layer: q 8x8, k and v 4x8 each, o 8x8, gate/up 16x8 each, down 8x16 -> 64+32+32+64+128+128+128 = 576
    assert tiny.linear_rows_and_elements() == (3 * (8 + 4 + 4 + 8 + 16 + 16 + 8) + 10, 3 * 576 + 10 * 8)
    x = features(tiny, context=5)
    assert x == {"token": 1.0, "layer": 3.0, "int8_layer": 0.0, "float_bytes": 4.0 * (3 * 576 + 80),
                 "int8_bytes": 0.0, "kv_bytes": 4.0 * 3 * 2 * 4 * 5}
    q = features(DecoderShape(8, 16, 2, 1, 3, 10, int8=True), context=5)
    assert q["float_bytes"] == 0 and q["int8_bytes"] == 3 * 576 + 80 + 4 * 202 and q["int8_layer"] == 3


def test_smollm2_shape_counts_its_linear_weights():
    # SmolLM2-135M: 134.5 M parameters, of which embeddings 28.3 M (tied head) and norms 35 k
    _, elements = SMOL.linear_rows_and_elements()
    assert elements == 30 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536) + 49152 * 576


def test_nnls_is_least_squares_when_that_is_non_negative_and_clamps_otherwise():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert np.allclose(nnls(a, np.array([1.0, 2.0, 3.0])), [1.0, 2.0])
    # unconstrained: x = (2, -1) fits exactly; with x >= 0 the best has x2 = 0, and then rows 1 and 3
    # ask x1 = 2 and x1 = 1: x1 = 1.5 (row 2's residual of 1 does not depend on x1)
    assert np.allclose(nnls(a, np.array([2.0, -1.0, 1.0])), [1.5, 0.0])


def test_fit_recovers_known_coefficients_from_synthetic_measurements():
    truth = CostModel({"token": 2e-4, "layer": 6e-5, "int8_layer": 3e-5, "float_bytes": 1.1e-10,
                       "int8_bytes": 1.6e-10, "kv_bytes": 4e-10})
    data = [Measurement(s, c, truth.predict(s, c)) for s, c in zip(shapes(), [64, 512, 128, 256, 512, 64] * 2)]
    model = fit(data)
    for name in FEATURES:
        assert model.coefficients[name] == pytest.approx(truth.coefficients[name], rel=1e-6), name
    assert max(abs(c["relative_error"]) for c in model.calibration) < 1e-9
    assert model.predict(SMOL, 300) == pytest.approx(truth.predict(SMOL, 300), rel=1e-6)


def test_fit_with_noise_predicts_a_held_out_shape_within_the_noise():
    truth = CostModel({"token": 2e-4, "layer": 6e-5, "int8_layer": 3e-5, "float_bytes": 1.1e-10,
                       "int8_bytes": 1.6e-10, "kv_bytes": 4e-10})
    rng = np.random.default_rng(0)
    data = [Measurement(s, c, truth.predict(s, c) * (1 + rng.uniform(-0.03, 0.03)))
            for s, c in zip(shapes() * 2, [64, 512, 128, 256, 512, 64] * 4)]
    model = fit(data)
    assert all(v >= 0 for v in model.coefficients.values())
    for held_out in (SMOL, DecoderShape(576, 768, 9, 3, 24, 49152, int8=True)):
        assert model.predict(held_out, 512) == pytest.approx(truth.predict(held_out, 512), rel=0.05)


def test_a_float_only_calibration_leaves_the_int8_terms_at_zero_and_round_trips():
    truth = CostModel({"token": 2e-4, "layer": 6e-5, "int8_layer": 0.0, "float_bytes": 1.1e-10,
                       "int8_bytes": 0.0, "kv_bytes": 4e-10})
    data = [Measurement(s, c, truth.predict(s, c)) for s, c in zip(shapes()[::2], [64, 512, 128, 256, 512, 64])]
    model = fit(data)
    assert model.coefficients["int8_layer"] == 0 and model.coefficients["int8_bytes"] == 0
    assert CostModel.from_dict(model.to_dict()) == model


def test_bad_input_is_a_clear_error():
    with pytest.raises(AsftError, match="at least 6 measurements"):
        fit([Measurement(SMOL, 64, 0.01)])
    with pytest.raises(AsftError, match="positive number"):
        fit([Measurement(s, 64, 0.0) for s in shapes()])
    with pytest.raises(AsftError, match="do not split"):
        DecoderShape(576, 1536, 9, 2, 30, 49152)
    with pytest.raises(AsftError, match="without coefficients for kv_bytes"):
        CostModel.from_dict({"coefficients": {name: 1.0 for name in FEATURES[:-1]}})
