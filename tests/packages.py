"""Signed model packages built from the generated sample models, for the update tests and bench.

    write_package(dir, samples, name="mlp", version=2)   # edgefleet.toml, model files, golden.npz
    sign_package(dir, publisher_key)                      # model.sig

Golden outputs are computed here with ONNX Runtime, so a package is always self-consistent
unless a test asks otherwise (`golden_offset`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from agent.samples import sample_input

# sample model -> (declared input shape, declared output shape)
SHAPES = {
    "mlp": ([-1, 64], [-1, 10]),
    "cnn": ([1, 3, 224, 224], [1, 1000]),
}


def write_package(
    directory: Path,
    samples: Path,
    *,
    name: str = "mlp",
    sample: str = "mlp",
    version: int = 1,
    variants: tuple[str, ...] = ("onnx-fp32", "openvino-fp32"),
    golden_offset: float = 0.0,
    regions: tuple[str, ...] = ("*",),
    min_agent_version: str = "0.1.0",
    serving: str = "",
    files: dict[str, bytes] | None = None,
) -> Path:
    """A complete, unsigned package of the sample `sample` under the model name `name`;
    `serving`: the body of a [serving] table; `files`: more files (path -> content)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    onnx_file = samples / sample / "1" / "model.onnx"
    blocks = []
    for variant in variants:
        if variant == "onnx-fp32":
            shutil.copyfile(onnx_file, directory / "model.onnx")
            blocks.append(_variant(variant, "onnxruntime", ["model.onnx"]))
        elif variant == "openvino-fp32":
            # OpenVINO reads the ONNX file itself; a copy keeps each file in one variant.
            (directory / "openvino").mkdir(exist_ok=True)
            shutil.copyfile(onnx_file, directory / "openvino" / "model.onnx")
            blocks.append(_variant(variant, "openvino", ["openvino/model.onnx"]))
        elif variant == "openvino-ir":
            ir = samples / "cnn-openvino" / "1"
            (directory / "ir").mkdir(exist_ok=True)
            for part in ("model.xml", "model.bin"):
                shutil.copyfile(ir / part, directory / "ir" / part)
            blocks.append(_variant(variant, "openvino", ["ir/model.xml", "ir/model.bin"]))
        else:
            raise ValueError(f"no sample variant {variant!r}")
    x = sample_input(sample)["input"]
    y = _onnx_outputs(onnx_file, x) + np.float32(golden_offset)
    np.savez(directory / "golden.npz", **{"input/input": x, "output/output": y})
    in_shape, out_shape = SHAPES[sample]
    regions_toml = ", ".join(f'"{r}"' for r in regions)
    (directory / "edgefleet.toml").write_text(
        f'name = "{name}"\n'
        f"version = {version}\n"
        f'min_agent_version = "{min_agent_version}"\n'
        f"allowed_regions = [{regions_toml}]\n\n"
        f'[[inputs]]\nname = "input"\ndatatype = "FP32"\nshape = {in_shape}\n\n'
        f'[[outputs]]\nname = "output"\ndatatype = "FP32"\nshape = {out_shape}\n\n'
        + "".join(blocks)
        + '[[golden]]\nfile = "golden.npz"\natol = 1e-4\nrtol = 1e-3\n'
        + (f"\n[serving]\n{serving}" if serving else "")
    )
    for relative, content in (files or {}).items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_bytes(content)
    return directory


def _variant(name: str, runtime: str, files: list[str]) -> str:
    quoted = ", ".join(f'"{f}"' for f in files)
    return (
        f'[[variants]]\nname = "{name}"\nruntime = "{runtime}"\nprecision = "fp32"\n'
        f"files = [{quoted}]\n\n"
    )


def _onnx_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": x})[0]
