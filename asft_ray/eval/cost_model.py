"""A decode-cost model: CPU seconds per generated token of a Llama-shaped dense model, from its shapes.

One greedy decode step (batch 1, KV cache) of a dense decoder reads every linear weight once and
every cached key/value once, and runs a fixed amount of Python and small-op work per layer. On a
CPU at batch 1 the matmuls are bound by memory traffic, so the cost is modelled as

    seconds/token = c_token                      fixed per step (embedding, final norm, sampling)
                  + c_layer      * layers        per-layer small ops (norms, rotary, softmax, adds)
                  + c_int8_layer * layers        extra per-layer work of int8 linears (casts, padding)
                                                 (0 for a float model)
                  + c_float      * float bytes   float32 linear weights read (decoder linears + head)
                  + c_int8       * int8 bytes    int8 linear weights and their scales read
                  + c_kv         * kv bytes      float32 keys and values read at this context length

Every coefficient is non-negative and is fitted (`fit`) to measured decode costs of a few
shapes on the target machine (eval/cost_calibration.py measures them with eval/speed.py's
decode loop, for one model's shape; benchmarks/cost_model.py tests the fit on held-out shapes),
minimising the relative error. `predict` is then a dot product. It knows nothing
about caches: calibrate with models of the size it will be asked about.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from asft_ray.errors import AsftError

FEATURES = ("token", "layer", "int8_layer", "float_bytes", "int8_bytes", "kv_bytes")


@dataclass(frozen=True)
class DecoderShape:
    """What decode cost depends on. `int8`: decoder linears and head as int8 weights + float32 row
    scales (export/int8.py); otherwise float32."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    int8: bool = False

    def __post_init__(self):
        for name in ("hidden", "intermediate", "heads", "kv_heads", "layers", "vocab"):
            if getattr(self, name) < 1:
                raise AsftError(f"decoder shape: {name} must be at least 1, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise AsftError(f"decoder shape: {self.heads} heads do not split into {self.kv_heads} KV heads")

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @classmethod
    def from_config(cls, config, int8: bool = False) -> "DecoderShape":
        """From a transformers Llama-style config (head_dim read when present)."""
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size,
                   heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                   layers=config.num_hidden_layers, vocab=config.vocab_size,
                   head_dim=getattr(config, "head_dim", 0) or 0, int8=int8)

    def linear_rows_and_elements(self) -> tuple[int, int]:
        """(output rows, weight elements) of all decoder linears and the head."""
        q, kv = self.heads * self.dim, self.kv_heads * self.dim
        per_layer_rows = q + 2 * kv + self.hidden + 2 * self.intermediate + self.hidden
        per_layer = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate
        return self.layers * per_layer_rows + self.vocab, self.layers * per_layer + self.vocab * self.hidden


def features(shape: DecoderShape, context: int) -> dict[str, float]:
    """The model's regressors for one decode step with `context` tokens in the KV cache."""
    if context < 1:
        raise AsftError(f"context must be at least 1 token, got {context}")
    rows, elements = shape.linear_rows_and_elements()
    return {
        "token": 1.0,
        "layer": float(shape.layers),
        "int8_layer": float(shape.layers if shape.int8 else 0),
        "float_bytes": 0.0 if shape.int8 else 4.0 * elements,
        "int8_bytes": float(elements + 4 * rows) if shape.int8 else 0.0,
        "kv_bytes": 4.0 * shape.layers * 2 * shape.kv_heads * shape.dim * context,
    }


@dataclass(frozen=True)
class Measurement:
    shape: DecoderShape
    context: int  # tokens in the KV cache, averaged over the measured steps
    seconds_per_token: float


@dataclass(frozen=True)
class CostModel:
    coefficients: dict[str, float]
    calibration: list[dict] = field(default_factory=list)  # per measurement: measured, fitted, relative error

    def predict(self, shape: DecoderShape, context: int) -> float:
        """Seconds per generated token."""
        x = features(shape, context)
        return sum(self.coefficients[name] * x[name] for name in FEATURES)

    def to_dict(self) -> dict:
        return {"coefficients": dict(self.coefficients), "calibration": list(self.calibration)}

    @classmethod
    def from_dict(cls, data: dict) -> "CostModel":
        missing = [name for name in FEATURES if name not in data.get("coefficients", {})]
        if missing:
            raise AsftError(f"cost model without coefficients for {', '.join(missing)}")
        return cls({name: float(data["coefficients"][name]) for name in FEATURES}, list(data.get("calibration", [])))


def predicted_speed(model: CostModel, shape: DecoderShape, context: int) -> dict:
    """The decode speed eval/speed.measure_speed would report, as `model` predicts it for `shape`
    with `context` tokens in the KV cache; marked `predicted` (no prefill or memory: nothing ran)."""
    seconds = model.predict(shape, context)
    return {"decode_tok_s": 1 / seconds, "seconds_per_token": seconds, "context": context, "predicted": True}


def nnls(a: np.ndarray, b: np.ndarray, iterations: int = 200) -> np.ndarray:
    """argmin ||a x - b|| over x >= 0 (Lawson-Hanson active set)."""
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(iterations):
        gradient = a.T @ (b - a @ x)
        if passive.all() or gradient[~passive].max(initial=-np.inf) <= 1e-12 * max(1.0, np.abs(gradient).max()):
            break
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            blocked = passive & (z <= 0)
            gap = x[blocked] - z[blocked]
            step = np.min(np.where(gap > 0, x[blocked] / np.where(gap > 0, gap, 1.0), 0.0))
            x = x + step * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


def fit(measurements: list[Measurement]) -> CostModel:
    """Non-negative coefficients minimising the squared relative error over the measurements.
    Features are rescaled to unit size before solving, so bytes and counts weigh alike."""
    if len(measurements) < len(FEATURES):
        raise AsftError(f"a cost model needs at least {len(FEATURES)} measurements, got {len(measurements)}")
    bad = [m for m in measurements if not (m.seconds_per_token > 0 and math.isfinite(m.seconds_per_token))]
    if bad:
        raise AsftError(f"measured cost must be a positive number of seconds, got {bad[0].seconds_per_token}")
    x = np.array([[features(m.shape, m.context)[name] for name in FEATURES] for m in measurements])
    y = np.array([m.seconds_per_token for m in measurements])
    rows = x / y[:, None]  # relative error: divide each equation by its measured value
    norms = np.linalg.norm(rows, axis=0)
    norms[norms == 0] = 1.0  # a feature absent from every measurement (e.g. no int8) keeps 0
    coef = nnls(rows / norms, np.ones(len(y))) / norms
    model = CostModel(dict(zip(FEATURES, coef.tolist())))
    calibration = [{"shape": asdict(m.shape), "context": m.context, "measured": m.seconds_per_token,
                    "fitted": model.predict(m.shape, m.context),
                    "relative_error": model.predict(m.shape, m.context) / m.seconds_per_token - 1} for m in measurements]
    return CostModel(model.coefficients, calibration)
