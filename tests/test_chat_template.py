"""Chat templates are untrusted (they come from model files): hostile ones end in one
PocketLMError line, within bounds of time and memory, and real ones render as before."""

from __future__ import annotations

import time

import pytest
from conftest import CHATML, GEMMA_TEMPLATE

from pocketlm import chat_template
from pocketlm.errors import PocketLMError

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_real_templates_render_as_hugging_face_renders_them():
    assert chat_template.render(CHATML, messages=MESSAGES, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    text = chat_template.render(
        GEMMA_TEMPLATE, messages=MESSAGES, add_generation_prompt=False, bos_token="<bos>"
    )
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"


@pytest.mark.parametrize(
    "template, needle",
    [
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}{% endfor %}"
            "{% endfor %}{% endfor %}",
            "longer than 2 s",
        ),
        ("{{ 'x' * 10 ** 10 }}", "repetition longer than"),
        ("{{ [1, 2] * 10 ** 9 }}", "repetition longer than"),
        ("{{ 2 ** 100000000 }}", "exponent above"),
        ("{{ 'x'.center(10 ** 10) }}", "integer argument above"),
        ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "output longer than"),
        ("{{ range(10 ** 6) | list }}", "OverflowError"),  # jinja2's sandbox caps range at 100,000
        ("{{ range(10 ** 12) | list }}", "integer argument above"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
        ("{{ messages.__class__.__mro__ }}", "failed"),
        ("{{ raise_exception('roles must alternate') }}", "refused the conversation: roles must alternate"),
        ("{% if %}", "TemplateSyntaxError"),
    ],
)
def test_a_hostile_template_is_stopped_with_one_line(template, needle):
    start = time.monotonic()
    with pytest.raises(PocketLMError, match="the model's chat template") as info:
        chat_template.render(template, messages=MESSAGES, add_generation_prompt=True)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert time.monotonic() - start < chat_template.MAX_SECONDS + 3
