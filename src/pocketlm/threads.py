"""How pocketlm's numba threads and numpy's BLAS threads share the cores, set on import of
pocketlm (`pocketlm/__init__.py` imports this first)."""

import os
import sys

_NUMPY_FIRST = "numpy" in sys.modules  # numpy, and with it OpenBLAS, loaded before pocketlm
_TIMEOUT_SET = "OPENBLAS_THREAD_TIMEOUT" in os.environ  # by the user: kept

# numba's OpenMP threads and OpenBLAS's take turns on the same cores. By default idle OpenMP
# threads spin long enough to halve the speed of the BLAS prefill that follows a numba call
# (SmolLM2 prefill 160 -> 310 tok/s with a short spin, decode unchanged; a passive wait instead
# cost decode a third). Read when OpenMP starts, so it is set before anything can start it.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
# OpenBLAS's idle threads, in turn, spin 2^28 cycles (about 0.1 s) after each product: through a
# prefill they take the cores from numba's threads between its matmuls, and after it the first
# decode steps (52-128 ms instead of 16-20). Its shortest spin (2^4 cycles): SmolLM2 prefill
# +25-29%, medians of 6 alternating runs (benchmarks/RESULTS.md). Read when numpy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _respin_loaded_openblas() -> bool:
    """numpy came first (`import numpy` above `import pocketlm`, as most scripts sort them), so its
    OpenBLAS read its settings before the line above: have it read them again (`openblas_read_env`)
    and stop its thread pool (`blas_thread_shutdown_`), which its next product starts afresh with
    the short spin. Without this, SmolLM2's prefill ran at 320-490 tok/s instead of 520-900 and the
    first decode step after it took 80-115 ms instead of 10-16 (benchmarks/RESULTS.md). Both calls
    are exported by the OpenBLAS that numpy's wheels ship; False where numpy's BLAS is another
    library, runs OpenMP threads (no spin setting) or lacks them."""
    import ctypes

    try:
        from threadpoolctl import threadpool_info

        libraries = [
            info["filepath"]
            for info in threadpool_info()
            if info.get("internal_api") == "openblas" and info.get("threading_layer") == "pthreads"
        ]
    except Exception:  # threadpoolctl's inspection of the loaded libraries failed: leave them
        return False
    done = False
    for path in libraries:
        try:
            library = ctypes.CDLL(path)
            library.openblas_read_env()
            library.blas_thread_shutdown_()
            done = True
        except (OSError, AttributeError):
            continue
    return done


# whether numpy's OpenBLAS threads spin briefly in this process
BLAS_SPIN_SHORT = not _NUMPY_FIRST or _TIMEOUT_SET or _respin_loaded_openblas()
