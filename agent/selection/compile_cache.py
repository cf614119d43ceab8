"""OpenVINO's compile cache under the agent state dir, with a size cap.

Each OpenVINO candidate compiles into its own directory, named for the variant's digest and the
candidate's options, and passes it as CACHE_DIR. The chosen candidate's directory goes into the
decision, so the serving load reads the compiled blob instead of compiling again (an NPU or GPU
compile can take a minute). After a selection, `prune` removes what no decision uses: this run's
losers at once, older unused directories after a grace period (another selection may be filling
them), then whole directories, least recently used first, until the total fits the cap.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from agent.selection.candidates import Candidate
from agent.selection.variants import Variant

GRACE_SECONDS = 600.0


@dataclass
class PruneReport:
    removed: list[Path] = field(default_factory=list)
    freed_bytes: int = 0
    total_bytes: int = 0  # what is left


class CompileCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes

    def dir_for(self, candidate: Candidate, variant: Variant) -> Path:
        return self.root / f"{variant.digest[:16]}-{candidate.ident}"

    def prune(
        self, in_use: set[str], discard: Collection[Path] = (), now: float | None = None
    ) -> PruneReport:
        """Remove directories no decision uses, then the least recently used over the cap."""
        report = PruneReport()
        if not self.root.is_dir():
            return report
        now = time.time() if now is None else now
        entries = []
        for directory in self.root.iterdir():
            if not directory.is_dir():
                continue
            size, last_used = _usage(directory)
            used = str(directory) in in_use
            stale = now - last_used > GRACE_SECONDS
            if not used and (directory in discard or stale):
                self._remove(directory, size, report)
            else:
                entries.append((last_used, directory, size))
        total = sum(size for _, _, size in entries)
        for _, directory, size in sorted(entries):  # least recently used first
            if total <= self.max_bytes:
                break
            # Over the cap even a directory in use goes; its model compiles again on next load.
            self._remove(directory, size, report)
            total -= size
        report.total_bytes = total
        return report

    def _remove(self, directory: Path, size: int, report: PruneReport) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        report.removed.append(directory)
        report.freed_bytes += size


def _usage(directory: Path) -> tuple[int, float]:
    """Bytes under a directory and when it was last written or (where atime is kept) read."""
    size, last = 0, directory.stat().st_mtime
    for path in directory.rglob("*"):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if path.is_file():
            size += stat.st_size
        last = max(last, stat.st_mtime, stat.st_atime)
    return size, last
