"""LiteRT delegate libraries on this node: which accelerator each found library drives.

Kept apart from the LiteRT adapter so that the agent can tell which delegates are installed
without importing LiteRT: accelerator selection puts them in its key, and a delegate that
appears or goes makes it measure again.
"""

from __future__ import annotations

import os
from pathlib import Path

# device -> delegate library file names, in order of preference
DELEGATE_LIBRARIES = {
    "EDGETPU": ("libedgetpu.so.1", "libedgetpu.1.dylib", "edgetpu.dll"),
    "GPU": ("libtensorflowlite_gpu_delegate.so",),
    "NPU": ("libvx_delegate.so", "libethosu_delegate.so"),
}
# Extra directories to search first (colon-separated), e.g. a vendor SDK's lib directory.
DELEGATE_PATH_ENV = "EDGEFLEET_LITERT_DELEGATE_PATH"
_SYSTEM_LIBRARY_DIRS = (
    "/usr/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/local/lib",
)


def delegates() -> dict[str, Path]:
    """Accelerator device -> the delegate library found for it on this node."""
    extra = [d for d in os.environ.get(DELEGATE_PATH_ENV, "").split(os.pathsep) if d]
    found: dict[str, Path] = {}
    for device, names in DELEGATE_LIBRARIES.items():
        for directory in (*extra, *_SYSTEM_LIBRARY_DIRS):
            hit = next((Path(directory, n) for n in names if Path(directory, n).is_file()), None)
            if hit is not None:
                found[device] = hit
                break
    return found
