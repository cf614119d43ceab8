"""Named points in the update lifecycle where a test (or an operator chasing a bug) can stop it.

    EDGEFLEET_UPDATE_PAUSE_AT=SIGNATURE_OK       right after that state is recorded
    EDGEFLEET_UPDATE_PAUSE_AT=DOWNLOADING:65536  once a download has written that many bytes
    EDGEFLEET_UPDATE_PAUSE_AT=SWITCHING          after the serving directory is renamed in,
                                                 before the journal records ACTIVE
    EDGEFLEET_UPDATE_PAUSE_AT=ROLLING_BACK       in a rollback: the previous version served
                                                 again, the journal not yet changed

On reaching it the process prints `EDGEFLEET-PAUSED <point>` on stdout and waits to be killed:
the crash tests SIGKILL it there, at every step, and check what a restart makes of it.
"""

from __future__ import annotations

import os
import sys
import time

PAUSE_ENV = "EDGEFLEET_UPDATE_PAUSE_AT"
ANNOUNCE = "EDGEFLEET-PAUSED"


class Checkpoints:
    def __init__(self, pause_at: str | None = None) -> None:
        name, _, offset = (pause_at or "").partition(":")
        self._name = name or None
        self._offset = int(offset) if offset.isascii() and offset.isdigit() else None

    @classmethod
    def from_environment(cls) -> Checkpoints:
        return cls(os.environ.get(PAUSE_ENV))

    def reached(self, name: str, offset: int | None = None) -> None:
        if self._name != name:
            return
        if self._offset is not None and (offset is None or offset < self._offset):
            return
        print(f"{ANNOUNCE} {name}{'' if offset is None else f':{offset}'}", flush=True)
        sys.stdout.flush()
        while True:  # until the test kills this process
            time.sleep(3600)
