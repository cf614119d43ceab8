"""Triton's classification extension: an output asked for with `"classification": k` comes back
as its k highest-valued classes instead of the raw tensor.

The answer is a BYTES tensor of shape [rows, k] for a model the server batches ([k] for one it
does not), each element `"<value>:<index>"` or `"<value>:<index>:<label>"` when the model has
labels for that output, highest value first (ties: lower index first). `tritonclient`'s
`InferRequestedOutput(name, class_count=k)` asks for it, and Triton's image_client example
prints it. Labels come from a text file in the version directory, one label per line, named
in model.toml:

    labels = { output = "labels.txt" }
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.serving.config import ModelConfigError, read_small_file

# A model's label files together: each label becomes a Python string (~50 bytes beside its
# text), so a bound on bytes alone would let 16 MiB of one-letter lines cost ~400 MB, 64 such
# files (one per output) tens of GB.
MAX_LABEL_FILE_BYTES = 16 * 1024 * 1024
MAX_LABELS = 1 << 20
# A label is a class name; long ones would multiply through every answer (rows x k of them).
MAX_LABEL_CHARS = 1024
MAX_CLASS_COUNT = 1 << 16  # what a request may ask for (cut to the output's classes)
# Strings in one answer (rows x classes): each costs the event loop about a microsecond.
MAX_CLASS_ENTRIES = 1 << 16


def read_labels(directory: Path, files: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """output name -> its labels, from the files model.toml names (checked there to be plain
    file names); ModelConfigError for a file that is missing, not a regular file or not UTF-8,
    and for files that hold more than MAX_LABEL_FILE_BYTES or MAX_LABELS together."""
    labels = {}
    left, count = MAX_LABEL_FILE_BYTES, 0
    for output, name in files.items():
        try:
            # not followed: a link in a model directory could point anywhere
            data = read_small_file(
                directory / name,
                left,
                "a label file",
                follow_links=False,
                size_hint=f"a model's label files hold {MAX_LABEL_FILE_BYTES >> 20} MiB together",
            )
        except OSError as exc:
            raise ModelConfigError(
                f"labels for output {output!r}: cannot open {name}: {exc.strerror or exc}"
            ) from None
        except ModelConfigError as exc:
            raise ModelConfigError(f"labels for output {output!r}: {exc}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelConfigError(
                f"labels for output {output!r}: {name} is not UTF-8: {exc}"
            ) from None
        left -= len(data)
        lines = text.split("\n")
        if lines[-1] == "":  # the file's last newline ends a line; it starts no label
            lines.pop()
        count += len(lines)
        if count > MAX_LABELS:
            raise ModelConfigError(
                f"labels for output {output!r}: {name} brings the model's labels to more than "
                f"{MAX_LABELS} in all"
            )
        for number, line in enumerate(lines, 1):
            if len(line) > MAX_LABEL_CHARS:
                raise ModelConfigError(
                    f"labels for output {output!r}: {name} line {number} is longer than "
                    f"{MAX_LABEL_CHARS} characters"
                )
        labels[output] = tuple(line.rstrip("\r") for line in lines)
    return labels


def class_count(output: str, value) -> int:
    """The `classification` parameter's k, checked."""
    if type(value) is not int or not 1 <= value <= MAX_CLASS_COUNT:
        raise ValueError(
            f"output {output!r}: 'classification' must be an integer in [1, {MAX_CLASS_COUNT}], "
            f"got {value!r}"
        )
    return value


def classify(
    array: np.ndarray, count: int, labels: tuple[str, ...] | None, batched: bool
) -> np.ndarray:
    """The top `count` classes of each row of `array` (the whole array when not `batched`).
    ValueError if the answer would hold more than MAX_CLASS_ENTRIES strings."""
    rows = array.reshape(array.shape[0] if batched else 1, -1)
    count = min(count, rows.shape[1])
    if rows.shape[0] * count > MAX_CLASS_ENTRIES:
        raise ValueError(
            f"classification would answer {rows.shape[0]} x {count} classes, more than "
            f"{MAX_CLASS_ENTRIES}; ask for fewer"
        )
    floating = rows.dtype.kind == "f"
    out = np.empty((rows.shape[0], count), dtype=object)
    for r, row in enumerate(rows):
        if floating and np.isnan(row).any():
            # NaN ranks lowest, below -inf too: the others first, then the NaNs in index order
            valid = np.flatnonzero(~np.isnan(row))
            best = valid[_top(row[valid], min(count, len(valid)))]
            top = np.concatenate([best, np.flatnonzero(np.isnan(row))])[:count]
        else:
            top = _top(row, count)
        for c, index in enumerate(top.tolist()):
            value = row[index]
            text = _float_text(float(value)) if floating else str(int(value))
            # as Triton: no label (beyond the file, or an empty line) adds no ":label"
            label = labels[index] if labels is not None and index < len(labels) else ""
            entry = f"{text}:{index}:{label}" if label else f"{text}:{index}"
            out[r, c] = entry.encode()
    return out if batched else out[0]


_EXACT_INTEGERS = float(1 << 53)  # from here on every double is an integer


def _float_text(value: float) -> str:
    """`f"{value:f}"` (C's %f, as Triton's std::to_string), without its cost on huge values:
    %f of 1e308 takes some 25 microseconds on the event loop, ten times a small value's, while
    the same 309 digits come from the (exact) integer in a tenth of that."""
    if abs(value) >= _EXACT_INTEGERS and value not in (np.inf, -np.inf):
        return f"{int(value)}.000000"
    return f"{value:f}"


def _top(keys: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest keys, highest first, equal keys in index order; in O(n)
    for the selection (a segmentation output has millions of values), then a sort of `count`."""
    n = len(keys)
    if count == 0:
        return np.empty(0, np.intp)
    if count < n:
        threshold = np.partition(keys, n - count)[n - count]  # the count-th highest key
        above = np.flatnonzero(keys > threshold)
        ties = np.flatnonzero(keys == threshold)[: count - len(above)]
        chosen = np.sort(np.concatenate([above, ties]))
    else:
        chosen = np.arange(n)
    # A stable ascending sort of the reversed keys, read backwards: highest first, equal keys
    # in index order; no negation, which unsigned integers would wrap.
    picked = keys[chosen]
    order = len(picked) - 1 - np.argsort(picked[::-1], kind="stable")[::-1]
    return chosen[order]
