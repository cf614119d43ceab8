"""Seeded mutations of valid inputs, for tests that feed an interface what nobody wrote down:
a JSON node replaced by a hostile value, deleted or grown; bytes flipped, cut or inserted."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Sequence

# Values that break assumptions in general: types, signs, sizes, empties, odd strings.
HOSTILE = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 1.5, -0.0, 1e308,
    "", "x", "\u00fc" * 3, "\ud800", "9" * 40, "a" * 5000, [], [[]], [None], [-1], [0], {},
    {"a": 1},
]  # fmt: skip


def nodes(doc, path: tuple = ()) -> Iterator[tuple[tuple, object]]:
    """Every (path, value) in a JSON tree, the root included (long lists: their first 70)."""
    yield path, doc
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from nodes(value, (*path, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc[:70]):
            yield from nodes(value, (*path, i))


def mutate_json(
    doc,
    rng: random.Random,
    hostile: Sequence = HOSTILE,
    words: Sequence[str] = (),
    keys: Sequence[str] = (),
):
    """A copy of `doc` (not the root itself) with one node replaced by a hostile value or one
    of `words` (strings that mean something to the interface), deleted, duplicated in its list,
    or a key of `keys` added beside it."""
    doc = copy.deepcopy(doc)
    path, _ = rng.choice([n for n in nodes(doc) if n[0]])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    action = rng.random()
    if action < 0.55 or (action < 0.7 and not words):
        parent[last] = copy.deepcopy(rng.choice(hostile))
    elif action < 0.7:
        parent[last] = rng.choice(words)
    elif action < 0.85:
        del parent[last]
    elif isinstance(parent, list):
        parent.insert(last, copy.deepcopy(parent[last]))
    else:
        parent[rng.choice([*keys, "zz"])] = copy.deepcopy(rng.choice(hostile))
    return doc


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """`data` with one to three bit flips, cuts, insertions of random bytes or truncations."""
    data = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        action = rng.random()
        at = rng.randrange(len(data) + 1)
        if action < 0.4 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif action < 0.6:
            del data[at : at + rng.randrange(1, 40)]
        elif action < 0.8:
            data[at:at] = rng.randbytes(rng.randrange(1, 40))
        else:
            del data[at:]
    return bytes(data)
