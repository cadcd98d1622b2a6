"""Chat templates come from model files, so they are untrusted: rendered in jinja2's sandbox (no
access to Python internals) and within bounds, so that a hostile template can neither hang the
process nor exhaust its memory. Every failure is one `PocketLMError` line.

Bounds: the render's wall time (checked on every line the compiled template runs, through a trace
function on this thread), the output's size, the results of `*` and `**`, and integer arguments of
calls (what `"x".center(n)` would allocate). jinja2's sandbox already caps `range` at 100,000 items.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import PocketLMError

MAX_SECONDS = 2.0  # real templates render in about a millisecond
MAX_CHARS = 1 << 22  # characters of output, and of any string or list a template builds
MAX_EXPONENT = 4096


class _Exceeded(Exception):
    pass


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if _sized(sequence, count) and len(sequence) * count > MAX_CHARS:
                    raise _Exceeded(f"a repetition longer than {MAX_CHARS} items")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise _Exceeded(f"an exponent above {MAX_EXPONENT}")
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, (str, list)) and len(result) > MAX_CHARS:
            raise _Exceeded(f"a value longer than {MAX_CHARS} items")
        return result

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja2's signature)
        if any(isinstance(a, int) and abs(a) > MAX_CHARS for a in (*args, *kwargs.values())):
            raise _Exceeded(f"a call with an integer argument above {MAX_CHARS}")
        return super().call(__context, __obj, *args, **kwargs)


def _sized(sequence: Any, count: Any) -> bool:
    return isinstance(sequence, (str, list, tuple)) and isinstance(count, int) and not isinstance(count, bool)


def _deadline_tracer(deadline: float):
    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Exceeded(f"rendering took longer than {MAX_SECONDS:g} s")
        return trace

    return trace


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise PocketLMError(f"the model's chat template refused the conversation: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render(template: str, **context: Any) -> str:
    """The template rendered with `context` (trim_blocks, lstrip_blocks, `raise_exception`, as
    Hugging Face renders chat templates), or a PocketLMError saying why not."""
    previous = sys.gettrace()
    try:
        compiled = _compiled(template)  # compiling is bounded by the template's length; not traced
        sys.settrace(_deadline_tracer(time.monotonic() + MAX_SECONDS))
        pieces, size = [], 0
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > MAX_CHARS:
                raise _Exceeded(f"output longer than {MAX_CHARS} characters")
            pieces.append(piece)
        return "".join(pieces)
    except PocketLMError:
        raise
    except _Exceeded as e:
        raise PocketLMError(f"the model's chat template was stopped: {e}") from None
    except (
        Exception
    ) as e:  # TemplateError, and whatever its Python raises: ZeroDivisionError, RecursionError, ...
        raise PocketLMError(f"the model's chat template failed: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)
