"""User-facing errors: one clear line saying what was wrong, where, and what to do."""


class PocketLMError(Exception):
    """Base of every error pocketlm reports to a user (the CLI prints it and exits 2)."""


class ModelFileError(PocketLMError):
    """A model file is missing, truncated, corrupt or uses something we do not support."""


class UnsupportedError(PocketLMError):
    """An architecture, tensor type or option we do not support."""


class InvalidOptionError(PocketLMError):
    """A bad option value (sampling parameters, bits, paths)."""


class ContextLengthError(PocketLMError):
    """A prompt or conversation longer than the context the model was opened with."""
