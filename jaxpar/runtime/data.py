"""Real text with no download: the bytes of the Python standard library's own source.

Tokens are bytes (vocabulary 256). Batches are random windows drawn from a generator
seeded by (seed, step), so a run resumed at step k sees exactly the data it would have.
"""

from __future__ import annotations

import pathlib
import sysconfig

import numpy as np

VOCAB = 256


def stdlib_bytes(max_bytes: int = 8 << 20) -> np.ndarray:
    """The stdlib's .py files (sorted paths, installed packages skipped) concatenated as
    uint8, at most `max_bytes`: the same array on every machine with the same Python."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    installed = {"site-packages", "dist-packages"}
    paths = sorted(p for p in root.rglob("*.py") if installed.isdisjoint(p.relative_to(root).parts))
    chunks, total = [], 0
    for path in paths:
        if total >= max_bytes:
            break
        chunk = path.read_bytes()[: max_bytes - total]
        chunks.append(chunk)
        total += len(chunk)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


class ByteCorpus:
    """Byte tokens of the standard library, served as deterministic random windows."""

    def __init__(self, tokens: np.ndarray | None = None, seed: int = 0):
        self.tokens = stdlib_bytes() if tokens is None else np.asarray(tokens, np.uint8)
        self.seed = seed

    def batch(self, step: int, batch_size: int, length: int) -> dict[str, np.ndarray]:
        """`batch_size` random windows of `length` + 1 bytes; targets are inputs shifted by
        one. The same (seed, step) always gives the same batch."""
        if len(self.tokens) <= length + 1:
            raise ValueError(f"the corpus has {len(self.tokens)} tokens; windows need {length + 2}")
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - length - 1, size=batch_size)
        windows = self.tokens[starts[:, None] + np.arange(length + 1)].astype(np.int32)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
