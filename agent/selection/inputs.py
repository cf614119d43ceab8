"""Inputs that candidates are checked and timed on, and the outputs they must reproduce.

Either the model's golden vectors (`golden.npz` next to the model files: arrays named
`input/<name>` and `output/<name>`), or seeded random inputs shaped from the reference
session's metadata with the reference's own outputs. Variants of one model may name their
tensors differently (a .tflite says "serving_default_input:0" where the ONNX says "input"), so a
candidate's tensors are matched by name and, failing that, by position.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from provisioning.package import ManifestError, load_npz
from runtimes.datatypes import from_numpy, to_numpy

GOLDEN_FILE = "golden.npz"
_SEED = 20261122
# The inputs the agent makes itself, all tensors together: random inputs and throughput batches.
# A model declares its shapes in a few bytes, so a static 2**20 x 2**20 input is a small file.
MAX_INPUT_ELEMENTS = 2**25  # 128 MiB of float32 (random floats are drawn in float64: 256 MiB)

# (name, datatype, shape) as the worker reports a session's tensors.
Spec = tuple[str, str, tuple[int, ...]]


class InputError(ValueError):
    """Inputs cannot be made or matched; the message says why."""


@dataclass(frozen=True)
class Reference:
    """What every candidate must reproduce."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]  # output name -> KServe datatype
    source: str  # "golden.npz" or the candidate that computed it

    def digest(self) -> str:
        """sha256 over every array's name, dtype, shape and bytes, each length-prefixed: the
        same bytes as int32 instead of float32, or reshaped, are other golden vectors."""
        sha = hashlib.sha256()
        for group in (self.inputs, self.outputs):
            sha.update(len(group).to_bytes(8, "big"))
            for name in sorted(group):
                array = np.ascontiguousarray(group[name])
                for part in (name.encode(), array.dtype.str.encode(), repr(array.shape).encode()):
                    sha.update(len(part).to_bytes(8, "big") + part)
                data = array.tobytes()
                sha.update(len(data).to_bytes(8, "big") + data)
        return sha.hexdigest()


def load_golden(path: Path) -> Reference | None:
    """The golden vectors in `path` (a golden.npz), or None when there is no such file.

    The file is read as a package's golden file is: each array's .npy header is checked (numeric
    dtype, a cap on the whole file's bytes) before anything is allocated or decompressed.
    """
    if not path.is_file():
        return None
    try:
        arrays = load_npz(path, str(path))
    except ManifestError as exc:
        raise InputError(str(exc)) from None
    inputs = {k.removeprefix("input/"): a for k, a in arrays.items() if k.startswith("input/")}
    outputs = {k.removeprefix("output/"): a for k, a in arrays.items() if k.startswith("output/")}
    if not inputs or not outputs:
        raise InputError(f"{path}: expected arrays named input/<name> and output/<name>")
    try:
        datatypes = {name: from_numpy(array.dtype) for name, array in outputs.items()}
    except ValueError as exc:  # a byte order or width no tensor has (>f4, float128)
        raise InputError(f"{path}: {exc}") from None
    return Reference(inputs=inputs, outputs=outputs, datatypes=datatypes, source=path.name)


def random_inputs(specs: list[Spec]) -> dict[str, np.ndarray]:
    """Deterministic inputs for these tensors; dynamic dimensions (-1) become 1.

    Floats are uniform in [0, 1) (the range of normalised images and most features); integers
    are small non-negative values, valid as class or token ids for any vocabulary.
    """
    shapes = {name: tuple(d if d >= 0 else 1 for d in shape) for name, _, shape in specs}
    elements = sum(math.prod(shape) for shape in shapes.values())
    if elements > MAX_INPUT_ELEMENTS:
        raise InputError(
            f"the inputs take {elements} elements, over the cap of {MAX_INPUT_ELEMENTS} for "
            "random inputs"
        )
    rng = np.random.default_rng(_SEED)
    inputs = {}
    for name, datatype, _ in specs:
        concrete = shapes[name]
        if datatype == "BYTES":
            raise InputError(
                f"input {name!r} is BYTES: random inputs cannot exercise it; ship golden vectors"
            )
        dtype = to_numpy(datatype)
        if dtype.kind == "f":
            inputs[name] = rng.random(concrete).astype(dtype)
        elif dtype.kind == "b":
            inputs[name] = rng.random(concrete) < 0.5
        else:
            inputs[name] = rng.integers(0, 8, concrete).astype(dtype)
    return inputs


def match_names(wanted: list[str], offered: list[str], what: str) -> dict[str, str]:
    """wanted name -> offered name: the same names, else the same count taken in order."""
    if set(wanted) <= set(offered):
        return {name: name for name in wanted}
    if len(wanted) == len(offered):
        return dict(zip(wanted, offered, strict=True))
    raise InputError(f"{what} {sorted(offered)} do not match the reference's {sorted(wanted)}")


def inputs_for(reference: Reference, specs: list[Spec]) -> dict[str, np.ndarray]:
    """The reference inputs under the candidate's input names, checked against its shapes."""
    names = match_names(list(reference.inputs), [s[0] for s in specs], "inputs")
    by_name = {s[0]: s for s in specs}
    inputs = {}
    for ref_name, name in names.items():
        array = reference.inputs[ref_name]
        shape = by_name[name][2]
        if len(shape) != array.ndim or any(
            d not in (-1, n) for d, n in zip(shape, array.shape, strict=True)
        ):
            raise InputError(
                f"input {name!r} takes shape {list(shape)}; "
                f"the reference input is {list(array.shape)}"
            )
        inputs[name] = array
    return inputs


def outputs_as_reference(
    reference: Reference, outputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A candidate's outputs renamed to the reference's output names."""
    names = match_names(list(reference.outputs), list(outputs), "outputs")
    return {ref_name: outputs[name] for ref_name, name in names.items()}


def batched(inputs: dict[str, np.ndarray], specs: list[Spec], batch: int) -> dict[str, np.ndarray]:
    """Inputs repeated along a dynamic first dimension, for the throughput objective.

    The batch is made smaller where `batch` items would take more than MAX_INPUT_ELEMENTS.
    """
    by_name = {s[0]: s for s in specs}
    if batch <= 1 or any(by_name[n][2][:1] != (-1,) for n in inputs):
        return inputs
    per_item = sum(a[:1].size for a in inputs.values())
    batch = max(1, min(batch, MAX_INPUT_ELEMENTS // max(per_item, 1)))
    return {n: np.repeat(a[:1], batch, axis=0) for n, a in inputs.items()}
