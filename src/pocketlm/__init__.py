"""pocketlm: open language models from checkpoint to fast inference on this device."""

import os

# numba's OpenMP threads and OpenBLAS's take turns on the same cores. By default idle OpenMP
# threads spin long enough to halve the speed of the BLAS prefill that follows a numba call
# (SmolLM2 prefill 160 -> 310 tok/s with a short spin, decode unchanged; a passive wait instead
# cost decode a third). Read when OpenMP starts, so it is set before anything can start it.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
# OpenBLAS's idle threads, in turn, spin 2^28 cycles (about 0.1 s) after each product: through a
# prefill they take the cores from numba's threads between its matmuls, and after it the first
# decode steps (52-128 ms instead of 16-20). Its shortest spin (2^4 cycles): SmolLM2 prefill
# +25-29%, medians of 6 alternating runs (benchmarks/RESULTS.md). Read when numpy loads
# OpenBLAS: without effect if numpy came first.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


from .api import GenerationOptions, LlmInference, Session, load
from .convert import ConversionConfig, convert
from .errors import ContextLengthError, InvalidOptionError, ModelFileError, PocketLMError, UnsupportedError
from .tools import Reply, ToolCall

__all__ = [
    "LlmInference",
    "Session",
    "GenerationOptions",
    "load",
    "convert",
    "ConversionConfig",
    "Reply",
    "ToolCall",
    "PocketLMError",
    "ModelFileError",
    "UnsupportedError",
    "InvalidOptionError",
    "ContextLengthError",
]
__version__ = "0.1.0"
