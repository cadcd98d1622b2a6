"""pocketlm: open language models from checkpoint to fast inference on this device."""

from .api import GenerationOptions, LlmInference, Session, load
from .convert import ConversionConfig, convert
from .errors import ContextLengthError, InvalidOptionError, ModelFileError, PocketLMError, UnsupportedError

__all__ = [
    "LlmInference", "Session", "GenerationOptions", "load", "convert", "ConversionConfig",
    "PocketLMError", "ModelFileError", "UnsupportedError", "InvalidOptionError", "ContextLengthError",
]
__version__ = "0.1.0"
