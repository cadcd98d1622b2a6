"""How pocketlm's numba threads and numpy's BLAS threads share the cores, set on import of
pocketlm before anything loads numpy (`pocketlm/__init__.py` imports this first)."""

import os
import sys

# numba's OpenMP threads and OpenBLAS's take turns on the same cores. By default idle OpenMP
# threads spin long enough to halve the speed of the BLAS prefill that follows a numba call
# (SmolLM2 prefill 160 -> 310 tok/s with a short spin, decode unchanged; a passive wait instead
# cost decode a third). Read when OpenMP starts, so it is set before anything can start it.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
# OpenBLAS's idle threads, in turn, spin 2^28 cycles (about 0.1 s) after each product: through a
# prefill they take the cores from numba's threads between its matmuls, and after it the first
# decode steps (52-128 ms instead of 16-20). Its shortest spin (2^4 cycles): SmolLM2 prefill
# +25-29%, medians of 6 alternating runs (benchmarks/RESULTS.md). Read when numpy loads
# OpenBLAS: without effect if numpy came first (`import numpy` above `import pocketlm`, as most
# scripts sort them), so then the CPU backend runs its prompts' BLAS products on one thread
# (`backends.cpu.one_blas_thread`).
BLAS_SPIN_SHORT = "numpy" not in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
