"""The SELECTED and SELF_TESTED steps: choose how to run the package here, then prove it.

`choose_variant` hands the downloaded variants to accelerator selection (agent.selection), which
loads each allowed (variant x runtime x device x options) candidate, checks it against the
package's golden vectors and measures it; the decision is cached by model digest and hardware,
so a restarted update does not measure again. `prepare_serving` writes the version directory
serving will load: the chosen variant's files, the publisher's label files, and a model.toml
with the runtime, device and threads chosen here and the manifest's `[serving]` settings
(batching, queue, deadlines, labels). `self_test` loads that directory exactly as serving will,
checks the settings against the model, and runs every golden set on it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

import sqlite_utils

from agent.update.errors import SelectionFailed, SelfTestFailed
from agent.update.layout import fsync_dir
from provisioning.package import SERVING_CONFIG_FILE as SERVING_CONFIG
from provisioning.package import GoldenVectors, Package, Variant


@dataclass(frozen=True, slots=True)
class Choice:
    variant: str
    runtime: str
    device: str
    threads: int | None
    extra: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False
    seconds: float = 0.0
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Choice:
        return cls(**data)


def choose_variant(
    package: Package,
    variants: list[str],
    work_dir: Path,
    *,
    profile: Any,
    database: sqlite_utils.Database,
    state_dir: Path,
) -> Choice:
    """Measure the downloaded `variants` of `package` on this node and return the winner."""
    # Selection and the runtimes are heavy imports that the other steps never need.
    from agent.selection import DecisionCache, Reference, SelectionError, Tolerance, choose

    view = _selection_view(package, variants, work_dir / "select")
    golden = package.golden_vectors(package.manifest.golden[0])
    reference = Reference(
        inputs=golden.inputs,
        outputs=golden.outputs,
        datatypes={d.name: d.datatype for d in package.manifest.outputs},
        source=golden.source,
    )
    # One tolerance for every candidate: the loosest any downloaded variant asks for; each
    # variant is held to its own in the self-test that follows.
    atol = max(_tolerance(package.manifest.variant(v), golden)[0] for v in variants)
    rtol = max(_tolerance(package.manifest.variant(v), golden)[1] for v in variants)
    tolerance = Tolerance.from_mapping(
        {d.datatype: {"atol": atol, "rtol": rtol} for d in package.manifest.outputs}
    )
    try:
        decision = choose(
            view,
            model=package.manifest.name,
            profile=profile,
            cache=DecisionCache(database),
            state_dir=state_dir,
            golden=reference,
            tolerance=tolerance,
        )
    except SelectionError as exc:
        reasons = sorted({r.reason for r in exc.results if r.reason})
        detail = "; ".join(reasons[:3])
        raise SelectionFailed(f"{exc}{': ' + detail if detail else ''}") from None
    finally:
        shutil.rmtree(view, ignore_errors=True)
    chosen = Path(decision.variant).stem
    return Choice(
        variant=chosen,
        runtime=decision.runtime,
        device=decision.device,
        threads=decision.options.threads or None,
        extra={k: v for k, v in decision.options.extra.items() if k != "CACHE_DIR"},
        from_cache=decision.from_cache,
        seconds=decision.selection_seconds,
        label=decision.candidate.label(),
    )


def prepare_serving(package: Package, choice: Choice, root: Path) -> Path:
    """Write `root`/<model>/<version>/ for serving: the chosen variant's files and model.toml."""
    manifest = package.manifest
    variant = manifest.variant(choice.variant)
    directory = root / manifest.name / str(manifest.version)
    if root.exists():
        shutil.rmtree(root)
    directory.mkdir(parents=True)
    try:
        names = variant.serving_names()  # checked when the manifest was read
    except ValueError as exc:
        raise SelfTestFailed(f"variant {variant.name}: {exc}") from None
    for relative, name in names.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(package.root / relative, target)
    # Label files may live anywhere in the package; model.toml names files in the version
    # directory, which holds the model's own: each gets a name of its own there, one no file
    # of the variant has (its file labels-0.txt, a hard link to the package's, would be written
    # over; a directory of that name would fail every retry).
    labels = {}
    names = (f"labels-{i}.txt" for i in itertools.count())
    free = (name for name in names if not os.path.lexists(directory / name))
    for output, relative in sorted(manifest.serving.get("labels", {}).items()):
        labels[output] = next(free)
        _link_or_copy(package.root / relative, directory / labels[output])
    settings = {**manifest.serving, **serving_settings(choice)}
    if labels:
        settings["labels"] = labels
    with open(directory / SERVING_CONFIG, "w", encoding="utf-8") as config:
        config.write("".join(f"{key} = {_toml_value(value)}\n" for key, value in settings.items()))
        config.flush()
        os.fsync(config.fileno())
    for written in (directory, directory.parent, root):
        fsync_dir(written)
    return directory


def _toml_value(value: Any) -> str:
    """A model.toml value: JSON strings, numbers, booleans and lists are TOML too; tables are
    written inline with quoted keys."""
    if isinstance(value, dict):
        pairs = ", ".join(f"{_toml_string(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + pairs + " }" if pairs else "{}"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def _toml_string(text: str) -> str:
    # JSON's escapes are TOML's, but not all of them: ensure_ascii writes a character beyond
    # U+FFFF as a surrogate pair (\ud83d\ude00), which TOML refuses, so a tensor named with
    # one made model.toml unreadable. Written as UTF-8 instead; DEL, which JSON leaves raw and
    # TOML does not accept raw, escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def serving_settings(choice: Choice) -> dict[str, Any]:
    """The model.toml keys that make serving load the chosen candidate.

    OpenVINO's hint and precision are written only where the serving configuration knows them
    (they pin accelerator selection when serving runs it).
    """
    from agent.serving.config import ModelConfig

    known = {f.name for f in fields(ModelConfig)}
    settings: dict[str, Any] = {"runtime": choice.runtime, "device": choice.device}
    if choice.threads:
        settings["threads"] = int(choice.threads)
    for key, option in (("hint", "PERFORMANCE_HINT"), ("precision", "INFERENCE_PRECISION_HINT")):
        if key in known and option in choice.extra:
            settings[key] = choice.extra[option]
    return settings


def self_test(package: Package, choice: Choice, serving_root: Path) -> str:
    """Load the prepared version directory as serving does; run every golden set. A summary."""
    from agent.selection.tolerance import Tolerance, compare
    from agent.serving.config import ModelConfig, ModelConfigError
    from runtimes import load
    from runtimes.base import RuntimeAdapterError
    from runtimes.loader import MODEL_SUFFIXES

    manifest = package.manifest
    directory = serving_root / manifest.name / str(manifest.version)
    try:
        config = ModelConfig.from_file(directory / SERVING_CONFIG)
        (model_file,) = [p for p in directory.iterdir() if p.suffix.lower() in MODEL_SUFFIXES]
        session = load(model_file, runtime=config.runtime, options=config.load_options())
    except (ModelConfigError, RuntimeAdapterError, ValueError) as exc:
        raise SelfTestFailed(
            f"the chosen variant does not load as serving loads it: {exc}"
        ) from None
    try:
        _check_interface(package, session)
        _check_serving_settings(directory, config, session, manifest.serving.get("labels", {}))
        variant = manifest.variant(choice.variant)
        worst = 0.0
        for golden in package.all_golden():
            atol, rtol = _tolerance(variant, golden)
            try:
                outputs = session.infer(golden.inputs)
            except Exception as exc:  # a runtime may raise anything on a bad model
                raise SelfTestFailed(f"{golden.source}: inference failed: {exc}") from None
            result = compare(
                outputs,
                golden.outputs,
                {d.name: d.datatype for d in manifest.outputs},
                Tolerance.from_mapping(
                    {d.datatype: {"atol": atol, "rtol": rtol} for d in manifest.outputs}
                ),
            )
            if not result.ok:
                raise SelfTestFailed(f"golden vectors {golden.source}: {result.problem}")
            worst = max(worst, result.max_error)
    finally:
        session.close()
    how = choice.label or choice.runtime
    return f"{len(manifest.golden)} golden set(s) pass on {how}, max error {worst:.2g}"


def _check_interface(package: Package, session: Any) -> None:
    for kind, declared, actual in (
        ("input", package.manifest.inputs, session.inputs),
        ("output", package.manifest.outputs, session.outputs),
    ):
        have = {s.name: s for s in actual}
        for decl in declared:
            spec = have.get(decl.name)
            if spec is None:
                raise SelfTestFailed(
                    f"the model has no {kind} {decl.name!r} (it has {sorted(have)})"
                )
            if spec.datatype != decl.datatype:
                raise SelfTestFailed(
                    f"{kind} {decl.name!r} is {spec.datatype}, the manifest declares "
                    f"{decl.datatype}"
                )


def _tolerance(variant: Variant, golden: GoldenVectors) -> tuple[float, float]:
    atol = golden.atol if variant.atol is None else variant.atol
    rtol = golden.rtol if variant.rtol is None else variant.rtol
    return atol, rtol


def _selection_view(package: Package, variants: list[str], directory: Path) -> Path:
    """One directory with each variant's model file named after the variant, as selection
    expects (it treats every model file in a directory as one variant)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for name in variants:
        variant = package.manifest.variant(name)
        primary = PurePosixPath(variant.model_file)
        _link_or_copy(
            package.root / variant.model_file, directory / f"{name}{primary.suffix.lower()}"
        )
        if primary.suffix.lower() == ".xml":
            _link_or_copy(
                package.root / str(primary.with_suffix(".bin")), directory / f"{name}.bin"
            )
    return directory


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _check_serving_settings(
    directory: Path, config: Any, session: Any, packaged: dict[str, str]
) -> None:
    """What serving checks at load, checked before the version goes live: batching on a model
    with a batch dimension, input formats of image inputs, readable labels for real outputs.
    `packaged`: output -> its label file as the manifest names it."""
    from agent.serving.model import ModelIncompatible, ServedModel

    problem = "the package's serving settings do not fit the model"
    try:
        ServedModel.check_compatible(session, config)
    except ModelIncompatible as exc:
        raise SelfTestFailed(f"{problem}: {exc}") from None
    try:
        ServedModel.load_labels(directory, config, session)
    except ModelIncompatible as exc:
        # Serving names the label files as the node named them (labels-0.txt, ...), names the
        # publisher never wrote: say which of the package's files each one is.
        names = "; ".join(
            f"{config.labels[output]} is the package's {path}"
            for output, path in sorted(packaged.items())
            if output in (config.labels or {})
        )
        raise SelfTestFailed(f"{problem}: {exc}" + (f" ({names})" if names else "")) from None
