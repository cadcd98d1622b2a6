"""pocketlm: open language models from checkpoint to fast inference on this device."""

import os

# numba's OpenMP threads and OpenBLAS's take turns on the same cores. By default idle OpenMP
# threads spin long enough to halve the speed of the BLAS prefill that follows a numba call
# (SmolLM2 prefill 160 -> 310 tok/s with a short spin, decode unchanged; a passive wait instead
# cost decode a third). Read when OpenMP starts, so it is set before anything can start it.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")


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
