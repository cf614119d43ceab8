"""`edgefleet-agent sample-models DIR`: write a small model repository to try the agent with."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.commands import path_arg


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "sample-models",
        help="write sample models (ONNX, OpenVINO IR, TFLite) into a model repository",
        description="Generate a model repository of small sample models, without downloading "
        "anything: an MLP with dynamic batching (ONNX), a CNN (ONNX and OpenVINO IR) and a "
        "fully connected TFLite model. Existing sample files in DIR are overwritten.",
    )
    parser.add_argument("dir", metavar="DIR", type=path_arg, help="model repository to write into")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.cli import UserError

    root: Path = args.dir
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} exists and is not a directory")
    try:
        from agent.samples import write_sample_repository

        written = write_sample_repository(root)
    except ImportError as exc:
        raise UserError(
            f"generating the samples needs {exc.name or 'a missing package'}: "
            "pip install 'edgefleet[samples,openvino]'"
        ) from exc
    except OSError as exc:
        raise UserError(f"cannot write to {root}: {exc.strerror or exc}") from exc

    print(f"Wrote {len(written)} files to {root}:")
    for path in written:
        print(f"  {path.relative_to(root)}  ({_size(path.stat().st_size)})")
    print()
    print(f"Serve them with:  edgefleet-agent serve --models {root}")
    return 0


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"
