"""How far a candidate's outputs may be from the reference, per output datatype.

An element passes when |candidate - reference| <= atol + rtol * |reference| (numpy's `allclose`
rule). The defaults hold float outputs to fp32-equivalent numerics: ONNX Runtime and OpenVINO in
f32 agree to ~1e-6, while bf16 inference (OpenVINO's CPU default on AVX512-BF16/AMX CPUs) moves a
CNN's logits by ~1e-2 and fp16 by ~1e-3, so those pass only when the model says it accepts them:

    [tolerance]              # in model.toml, or Tolerance.from_mapping(...)
    FP32 = { atol = 1e-2, rtol = 1e-2 }
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtimes.datatypes import DATATYPES


@dataclass(frozen=True, slots=True)
class Bound:
    atol: float
    rtol: float

    def describe(self) -> str:
        return f"atol {self.atol:g} + rtol {self.rtol:g} x |reference|"


# Quantized integer outputs may be one step off; other integers, booleans and bytes must be equal.
DEFAULT_BOUNDS: dict[str, Bound] = {
    "FP64": Bound(1e-4, 1e-3),
    "FP32": Bound(1e-4, 1e-3),
    "FP16": Bound(1e-3, 1e-2),
    "INT8": Bound(1.0, 0.0),
    "UINT8": Bound(1.0, 0.0),
}
EXACT = Bound(0.0, 0.0)


class ToleranceError(ValueError):
    """A tolerance setting is malformed."""


@dataclass(frozen=True)
class Tolerance:
    bounds: dict[str, Bound] = field(default_factory=lambda: dict(DEFAULT_BOUNDS))

    def bound(self, datatype: str) -> Bound:
        return self.bounds.get(datatype, DEFAULT_BOUNDS.get(datatype, EXACT))

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | None) -> Tolerance:
        """`{"FP32": {"atol": 1e-2, "rtol": 1e-2}, ...}` over the defaults."""
        bounds = dict(DEFAULT_BOUNDS)
        for name, values in (table or {}).items():
            datatype = str(name).upper()  # fp32 is FP32, with FP32's defaults under it
            if datatype not in DATATYPES:
                raise ToleranceError(
                    f"tolerance.{name}: not a datatype; expected one of "
                    f"{', '.join(sorted(DATATYPES))}"
                )
            if not isinstance(values, Mapping) or set(values) - {"atol", "rtol"}:
                raise ToleranceError(
                    f"tolerance.{datatype}: expected a table with atol and/or rtol, got {values!r}"
                )
            base = bounds.get(datatype, EXACT)
            numbers = {}
            for key in ("atol", "rtol"):
                value = values.get(key, getattr(base, key))
                # nan compares false with everything: `error > nan` would pass any output.
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not 0 <= value <= sys.float_info.max
                ):
                    raise ToleranceError(
                        f"tolerance.{datatype}.{key}: expected a finite number >= 0, got {value!r}"
                    )
                numbers[key] = float(value)
            bounds[datatype] = Bound(**numbers)
        return cls(bounds)

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"atol": b.atol, "rtol": b.rtol} for k, b in sorted(self.bounds.items())}


@dataclass(frozen=True, slots=True)
class Comparison:
    ok: bool
    max_error: float  # largest absolute difference over all outputs (inf when shapes differ)
    problem: str | None  # why it failed, for the rejected-candidate record


def compare(
    outputs: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    datatypes: Mapping[str, str],
    tolerance: Tolerance,
) -> Comparison:
    """Check every reference output against the candidate's output of the same name."""
    worst = 0.0
    for name, expected in reference.items():
        actual = outputs.get(name)
        if actual is None:
            return Comparison(False, math.inf, f"output {name!r} is missing")
        if actual.shape != expected.shape:
            return Comparison(
                False,
                math.inf,
                f"output {name!r} has shape {list(actual.shape)}, reference {list(expected.shape)}",
            )
        datatype = datatypes.get(name, "FP32")
        bound = tolerance.bound(datatype)
        if expected.dtype == object or actual.dtype == object:
            if not np.array_equal(actual, expected):
                return Comparison(False, math.inf, f"output {name!r} differs from the reference")
            continue
        if actual.dtype.kind in "iu" and expected.dtype.kind in "iu":
            error = _integer_error(actual, expected)
            max_error = float(error.max()) if error.size else 0.0
            worst = max(worst, max_error)
            over = _over_integer_bound(error, expected, bound)
            if over:
                return Comparison(
                    False,
                    worst,
                    f"output {name!r} differs from the reference by up to {max_error:.0f} "
                    f"({over} of {error.size} values over the {datatype} tolerance: "
                    f"{bound.describe()})",
                )
            continue
        a, e = actual.astype(np.float64), expected.astype(np.float64)
        if np.isnan(a).any() and not np.array_equal(np.isnan(a), np.isnan(e)):
            return Comparison(
                False, math.inf, f"output {name!r} has NaN where the reference has not"
            )
        finite = np.isfinite(e) & np.isfinite(a)
        if not np.array_equal(a[~finite], e[~finite], equal_nan=True):
            return Comparison(False, math.inf, f"output {name!r} has inf/NaN unlike the reference")
        error = np.abs(a[finite] - e[finite])
        max_error = float(error.max()) if error.size else 0.0
        worst = max(worst, max_error)
        allowed = bound.atol + bound.rtol * np.abs(e[finite])
        if error.size and (error > allowed).any():
            over = int((error > allowed).sum())
            return Comparison(
                False,
                worst,
                f"output {name!r} differs from the reference by up to {max_error:.3g} "
                f"({over} of {error.size} values over the {datatype} tolerance: "
                f"{bound.describe()})",
            )
    return Comparison(True, worst, None)


def _integer_error(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|actual - expected| exactly, as uint64: float64 holds integers only up to 2**53, so
    INT64 values 2**53 and 2**53 + 1 would compare equal."""
    if {actual.dtype.kind, expected.dtype.kind} == {"i", "u"} and 8 in (
        actual.dtype.itemsize,
        expected.dtype.itemsize,
    ):
        # No numpy integer holds both int64 and uint64: Python's integers do.
        pairs = zip(actual.ravel().tolist(), expected.ravel().tolist(), strict=True)
        return np.array([abs(x - y) for x, y in pairs], dtype=np.uint64)
    common = np.result_type(actual, expected)
    a, e = actual.astype(common), expected.astype(common)
    # In the unsigned type of the same width the difference wraps to its true magnitude.
    unsigned = np.dtype(f"u{common.itemsize}")
    au, eu = a.astype(unsigned), e.astype(unsigned)
    return np.where(a >= e, au - eu, eu - au).astype(np.uint64)


def _over_integer_bound(error: np.ndarray, expected: np.ndarray, bound: Bound) -> int:
    """How many integer errors exceed atol + rtol * |expected| (in integers when rtol is 0)."""
    if not error.size:
        return 0
    if bound.rtol == 0:
        allowed = min(math.floor(bound.atol), 2**64 - 1)
        return int((error > np.uint64(allowed)).sum())
    allowed_float = bound.atol + bound.rtol * np.abs(expected.astype(np.float64))
    return int((error.astype(np.float64) > allowed_float).sum())
