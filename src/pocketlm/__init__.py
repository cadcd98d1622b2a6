"""pocketlm: open language models from checkpoint to fast inference on this device."""

# first, before anything loads numpy: the idle spin of OpenMP's and OpenBLAS's threads
from . import threads  # noqa: F401  (isort keeps `from . import` above `from .api`)
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
