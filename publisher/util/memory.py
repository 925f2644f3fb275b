"""Process memory settings for the heavy steps (conversion, PyTorch references, the executor)."""

from __future__ import annotations

# glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB), after which the tensors of
# a large model's forward come from the heap and fragment it: tracing SDXL's UNet grew from 10 to over 19 GiB.
# A fixed 1 MB threshold gives every large tensor its own mapping, returned to the system when freed.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold for this process (see above); False where there is no glibc (macOS)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or not name.startswith("libc.so"):
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
