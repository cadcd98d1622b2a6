"""Structured output: JSON schema, regex and grammar constraints in every sampling mode, tool calling,
one-line errors; on tiny random models (whose free text is noise, so any valid output is the
grammar's doing) and on both real models against the 50 schemas of fixtures/json_schemas.json."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import numpy as np
import pytest

from pocketlm import LlmInference
from pocketlm.errors import InvalidOptionError, PocketLMError
from pocketlm.structured import (
    CLOSING_PER_LEVEL,
    CLOSING_TOKENS,
    MAX_DIGITS,
    Constraint,
    compile_format,
    json_grammar,
)
from pocketlm.tools import Reply, ToolPlan, function_schema, plain_messages

SCHEMAS = json.loads(
    (__import__("pathlib").Path(__file__).parent / "fixtures" / "json_schemas.json").read_text()
)
SAMPLING = [dict(temperature=0.0), dict(temperature=1.0, top_k=0), dict(temperature=1.0, top_k=20, top_p=0.9)]


def long_context(tiny, arch: str):
    """A tiny model whose context holds a tool listing in its 400-640-token vocabulary."""
    return tiny(arch, max_position_embeddings=2048)[2]


@pytest.fixture(scope="module")
def llama(tiny):
    return LlmInference(long_context(tiny, "llama"), max_tokens=1024, temperature=0.0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # byte-level BPE and SentencePiece vocabularies
def test_token_bytes_join_to_the_decoded_text(tiny, arch):
    tok = LlmInference(long_context(tiny, arch)).tokenizer
    text = 'Grammar engines see bytes: ünïcödé, 12.5 % and "quotes"\n\ttabs.'
    ids = tok.encode(text, add_bos=False)
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size
    assert b"".join(table[i] for i in ids).decode("utf-8") == tok.decode(ids) == text
    assert all(table[i].startswith(b"\xff") for i in tok.control_ids)


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "t1", "topk-topp"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_json_schema_output_validates_on_a_random_model(tiny, arch, sampling):
    llm = LlmInference(long_context(tiny, arch), max_tokens=1024, **sampling)
    for case in SCHEMAS[:12]:
        text = llm.generate_response(case["prompt"], max_new_tokens=300, response_format=case["schema"])
        jsonschema.validate(json.loads(text), case["schema"])
        assert llm.last_stats.finish_reason == "stop", (case["description"], text)


def test_json_object_regex_and_grammars(llama):
    text = llama.generate_response("x", max_new_tokens=200, response_format={"type": "json_object"})
    assert isinstance(json.loads(text), dict)
    regex = r"[A-Z]{3}-[0-9]{2,4}"
    text = llama.generate_response("x", response_format={"type": "regex", "regex": regex})
    assert re.fullmatch(regex, text), text
    lark = 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]/'
    text = llama.generate_response("x", response_format={"type": "grammar", "grammar": lark})
    assert re.fullmatch(r"yes|no|maybe [0-9]", text), text
    gbnf = 'root ::= "(" [a-c]+ ")"'
    text = llama.generate_response(
        "x", response_format={"type": "grammar", "grammar": gbnf, "syntax": "gbnf"}
    )
    assert re.fullmatch(r"\([a-c]+\)", text), text


def test_a_pydantic_model_is_a_schema(llama):
    pydantic = pytest.importorskip("pydantic")

    class Weather(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")  # a random model never ends a free string,
        city: str = pydantic.Field(max_length=20)  # so none is left open-ended
        unit: Literal["C", "F"]
        high: int

    text = llama.generate_response("x", max_new_tokens=300, response_format=Weather)
    Weather.model_validate_json(text)


def test_the_constraint_holds_for_one_call_of_a_session(llama):
    session = llama.create_session(temperature=0.0)
    session.add_query_chunk("first")
    assert re.fullmatch(
        "[0-9]{4}", session.generate_response(response_format={"type": "regex", "regex": "[0-9]{4}"})
    )
    session.add_query_chunk(" second")
    assert re.fullmatch(
        "[a-z]{5}", session.generate_response(response_format={"type": "regex", "regex": "[a-z]{5}"})
    )
    session.add_query_chunk(" third")
    free = session.generate_response(
        max_new_tokens=12
    )  # no constraint left behind: plain sampling, 12 tokens
    assert session.last_stats.generated_tokens == 12 or session.last_stats.finish_reason == "stop", free


def test_numbers_stop_after_sixteen_digits(llama):
    """A JSON grammar alone allows 1.0000... without end; the constraint forbids a further digit
    once MAX_DIGITS are written, and only then."""
    vocabulary = llama.model.grammar_vocabulary
    constraint = Constraint(
        vocabulary,
        json_grammar({"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}),
    )
    tok = llama.tokenizer
    digit = tok.encode("0", add_bos=False)
    assert len(digit) == 1
    logits = np.zeros(vocabulary.size, np.float32)
    for token in tok.encode('{"x": 1.', add_bos=False):
        constraint.accept(token)
    for _ in range(MAX_DIGITS):
        assert np.isfinite(constraint.mask(logits)[digit[0]])
        constraint.accept(digit[0])
    masked = constraint.mask(logits)
    assert not np.isfinite(masked[vocabulary.starts_with_digit]).any()
    assert np.isfinite(masked[tok.encode("}", add_bos=False)[0]])


# Strings, keys and arrays without bounds: a random model never ends them by itself.
UNBOUNDED = [
    {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 99}},
    {
        "type": "object",
        "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "tags"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "object", "properties": {"note": {"type": "string"}}}},
]


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "t1", "topk-topp"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_json_closes_within_its_token_budget_where_the_schema_sets_no_bounds(tiny, arch, sampling):
    llm = LlmInference(long_context(tiny, arch), max_tokens=1024, **sampling)
    for budget in (24, 48, 96):
        for schema in UNBOUNDED:
            text = llm.generate_response("x", max_new_tokens=budget, response_format=schema)
            jsonschema.validate(json.loads(text), schema)
            assert llm.last_stats.generated_tokens <= budget
            assert llm.last_stats.finish_reason == "stop", (budget, schema, text)


def test_json_closes_within_the_context_that_is_left(tiny):
    llm = LlmInference(long_context(tiny, "llama"), max_tokens=96, temperature=1.0, top_k=0)
    text = llm.generate_response("x", response_format=UNBOUNDED[1])
    jsonschema.validate(json.loads(text), UNBOUNDED[1])
    assert llm.last_stats.finish_reason == "stop"


def test_the_closing_reserve_ends_the_open_string_and_only_then(llama):
    """Far from the end of the budget every token the grammar allows stays; within the reserve, in
    a string, only tokens that end it; after it, only tokens that close the object."""
    vocabulary = llama.model.grammar_vocabulary
    constraint = Constraint(vocabulary, json_grammar(UNBOUNDED[0]))
    tok = llama.tokenizer
    logits = np.zeros(vocabulary.size, np.float32)
    for token in tok.encode('{"ab', add_bos=False):
        constraint.accept(token)
    free = np.isfinite(constraint.mask(logits, 100))
    assert free.sum() > vocabulary.starts_with_quote.sum()
    assert np.isfinite(constraint.mask(logits, CLOSING_TOKENS + 1 + CLOSING_PER_LEVEL)).sum() == free.sum()
    closing = np.isfinite(constraint.mask(logits, CLOSING_TOKENS + CLOSING_PER_LEVEL))
    assert closing.any() and not closing[~vocabulary.starts_with_quote].any()
    for token in tok.encode('": 7', add_bos=False):
        constraint.accept(token)
    closing = np.isfinite(constraint.mask(logits, 5))
    assert closing.any() and not closing[~vocabulary.closes_container].any()


def test_regexes_are_not_cut_short_by_the_closing_reserve(llama):
    vocabulary = llama.model.grammar_vocabulary
    constraint = Constraint(vocabulary, compile_format({"type": "regex", "regex": "[a-z]+"}))
    logits = np.zeros(vocabulary.size, np.float32)
    assert (np.isfinite(constraint.mask(logits, 1)) == constraint.allowed()).all()


@pytest.mark.parametrize(
    "response_format, needle",
    [
        ({"type": "json_schema", "json_schema": {"schema": "{not json"}}, "not valid JSON"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a schema"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "regex", "regex": "[a-"}, "regex"),
        ({"type": "regex", "regex": ""}, "non-empty"),
        ({"type": "grammar", "grammar": "start: (("}, "grammar"),
        ({"type": "grammar", "grammar": "root ::= (", "syntax": "gbnf"}, "GBNF"),
        ({"type": "grammar", "grammar": 'start: "a"', "syntax": "ebnf"}, "'lark' or 'gbnf'"),
        ({"type": "xml"}, "response_format type"),
        ("json", "must be a dict"),
    ],
)
def test_bad_formats_are_one_line_errors(llama, response_format, needle):
    with pytest.raises(InvalidOptionError) as e:
        llama.generate_response("x", response_format=response_format)
    message = str(e.value)
    assert needle in message and "\n" not in message, message


def _nested(depth: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(
    "response_format",
    [
        _nested(100),
        _nested(900),
        {"$defs": {"n": {"$ref": "#/$defs/n"}}, "$ref": "#/$defs/n"},
        {"anyOf": [{"const": f"v{i}"} for i in range(20000)]},
        {"type": "regex", "regex": "a{100000}"},
        {"type": "regex", "regex": "(x+x+)+y"},
        {"type": "regex", "regex": "((a{1,100}){1,100}){1,100}"},
        {"type": "grammar", "grammar": 'start: a\na: a | "x"'},
        {"type": "string", "pattern": "^(a|b){5000}$"},
    ],
    ids=[
        "nested-100",
        "nested-900",
        "ref-loop",
        "anyof-20000",
        "a{100000}",
        "catastrophic-regex",
        "nested-counts",
        "left-recursion",
        "long-pattern",
    ],
)
def test_hostile_formats_end_in_output_or_one_line_never_a_hang(llama, response_format):
    """Each finished within 1 s here; llguidance's fuel limits bound the rest."""
    try:
        llama.generate_response("x", max_new_tokens=20, response_format=response_format)
    except PocketLMError as e:
        assert "\n" not in str(e) and len(str(e)) < 600


def test_text_format_is_no_constraint():
    assert compile_format(None) is None and compile_format({"type": "text"}) is None


# -- tools ---------------------------------------------------------------------------------------


def get_weather(city: str, unit: Literal["C", "F"] = "C", days: int = 1) -> str:
    """The forecast for a city.

    Longer notes that stay out of the description."""
    return f"{city}: sunny"


def set_alarm(hour: int, minute: int, label: str | None = None) -> str:
    """Set an alarm."""
    return "ok"


def test_a_python_function_becomes_a_tool_definition():
    spec = function_schema(get_weather)
    assert spec == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"enum": ["C", "F"]},
                    "days": {"type": "integer"},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    label = function_schema(set_alarm)["function"]["parameters"]["properties"]["label"]
    assert label == {"anyOf": [{"type": "string"}, {"type": "null"}]}


# For random models, whose strings never end by themselves, every string is bounded.
BOUNDED_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["C", "F"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {  # a bare function spec
                "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                "minute": {"type": "integer", "minimum": 0, "maximum": 59},
            },
            "required": ["hour", "minute"],
            "additionalProperties": False,
        },
    },
]


@pytest.mark.parametrize("sampling", SAMPLING[:2], ids=["greedy", "t1"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_required_tool_calls_name_a_tool_and_fit_its_parameters(tiny, arch, sampling):
    llm = LlmInference(long_context(tiny, arch), max_tokens=1024, **sampling)
    reply = llm.chat(
        [{"role": "user", "content": "Wake me at 7"}],
        tools=BOUNDED_TOOLS,
        tool_choice="required",
        max_new_tokens=300,
    )
    assert reply.content is None and len(reply.tool_calls) == 1 and reply.finish_reason == "tool_calls"
    call = reply.tool_calls[0]
    spec = {"get_weather": BOUNDED_TOOLS[0]["function"], "set_alarm": BOUNDED_TOOLS[1]}[call.name]
    jsonschema.validate(call.arguments, spec["parameters"])
    named = llm.chat(
        [{"role": "user", "content": "Weather?"}],
        tools=BOUNDED_TOOLS,
        max_new_tokens=300,
        tool_choice={"type": "function", "function": {"name": "set_alarm"}},
    )
    assert [c.name for c in named.tool_calls] == ["set_alarm"]


def test_auto_tool_choice_gives_a_call_or_text_and_none_gives_text(llama):
    reply = llama.chat([{"role": "user", "content": "hi"}], tools=BOUNDED_TOOLS, max_new_tokens=300)
    assert (reply.content is None) != (not reply.tool_calls), reply
    plain = llama.chat(
        [{"role": "user", "content": "hi"}], tools=[get_weather], tool_choice="none", max_new_tokens=5
    )
    assert plain.tool_calls == [] and isinstance(plain.content, str)


def test_replies_are_parsed_into_text_or_calls():
    plan = ToolPlan(BOUNDED_TOOLS, "auto")
    assert plan.parse('{"response": "Hi \\"there\\""}') == Reply('Hi "there"')
    assert plan.parse('{"response": "cut sho') == Reply("cut sho")  # max_tokens reached inside the answer
    reply = plan.parse('{"tool_calls": [{"name": "set_alarm", "arguments": {"hour": 7, "minute": 0}}]}')
    assert reply.content is None and reply.finish_reason == "tool_calls"
    message = reply.message()
    assert message["tool_calls"][0]["function"] == {
        "name": "set_alarm",
        "arguments": '{"hour": 7, "minute": 0}',
    }
    assert message["tool_calls"][0]["id"].startswith("call_")


def test_a_hermes_template_renders_the_tools_and_calls_are_tagged(tiny):
    llm = LlmInference(long_context(tiny, "qwen2"), max_tokens=1024, temperature=0.0)
    llm.tokenizer.chat_template = (
        "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n"
        'Call one as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call><|im_end|>\n{% endif %}'
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    plan = ToolPlan([get_weather], "required", llm.tokenizer.chat_template)
    assert plan.hermes
    prompt = llm.tokenizer.apply_chat_template(
        plan.messages([{"role": "user", "content": "hi"}]), **plan.template_options()
    )
    assert "Tools: get_weather" in prompt
    reply = llm.chat(
        [{"role": "user", "content": "Weather in Oslo?"}],
        tools=BOUNDED_TOOLS[:1],
        tool_choice="required",
        max_new_tokens=300,
    )
    assert [c.name for c in reply.tool_calls] == ["get_weather"]
    jsonschema.validate(reply.tool_calls[0].arguments, BOUNDED_TOOLS[0]["function"]["parameters"])


def test_tool_turns_become_alternating_plain_turns():
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        }
    ]
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "Thanks. And tomorrow?"},
    ]
    out = plain_messages(messages, "tools here")
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert json.loads(out[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    }
    assert out[3]["content"] == "Tool result (call_1): sunny\n\nThanks. And tomorrow?"


@pytest.mark.parametrize(
    "tools, choice, needle",
    [
        ([], "auto", "non-empty list"),
        ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "function.name"),
        ([get_weather, get_weather], "auto", "two tools"),
        ([get_weather], "always", "tool_choice"),
        ([get_weather], {"type": "function", "function": {"name": "other"}}, "not among the tools"),
        ([{"type": "retrieval"}], "auto", "tools[0]"),
    ],
)
def test_bad_tools_are_one_line_errors(llama, tools, choice, needle):
    with pytest.raises(InvalidOptionError, match=re.escape(needle)):
        llama.chat([{"role": "user", "content": "x"}], tools=tools, tool_choice=choice)


# -- the real models: the issue's target ---------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "t1"])
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_fifty_schemas_all_validate_on_the_real_models(real_model, name, temperature):
    llm = LlmInference(real_model(name), max_tokens=1024, temperature=temperature, top_k=0)
    invalid = []
    for case in SCHEMAS:
        text = llm.generate_response(case["prompt"], max_new_tokens=256, response_format=case["schema"])
        try:
            jsonschema.validate(json.loads(text), case["schema"])
        except (ValueError, jsonschema.ValidationError) as e:
            invalid.append((case["description"], text[:200], str(e)[:200]))
    assert not invalid, invalid


def test_smollm2_calls_the_weather_tool_for_a_weather_question(real_model):
    llm = LlmInference(real_model("smollm2-135m"), max_tokens=1024, temperature=0.0)
    reply = llm.chat(
        [{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[get_weather, set_alarm],
        tool_choice="required",
        max_new_tokens=200,
    )
    assert [c.name for c in reply.tool_calls] == ["get_weather"]
    assert "Paris" in reply.tool_calls[0].arguments["city"]
