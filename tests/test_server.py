"""The OpenAI-compatible server: the official `openai` client against a live server, concurrency,
disconnects, error responses, and the chat page in a real browser."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

from pocketlm import LlmInference
from pocketlm.server import create_app

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


class LiveServer:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def smol_server(real_model):
    llm = LlmInference(real_model("smollm2-135m"))
    server = LiveServer(create_app(llm, "smollm2-135m", context_size=1024))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_server(tiny):
    llm = LlmInference(tiny("llama")[2])
    server = LiveServer(create_app(llm, "tiny", context_size=256))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(smol_server):
    from openai import OpenAI

    return OpenAI(base_url=smol_server.url + "/v1", api_key="unused")


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_openai_client_chat_completion(client, smol_server, real_model):
    reply = client.chat.completions.create(
        model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=40
    )
    choice = reply.choices[0]
    # the engine's own greedy reply (the answer itself is a near tie for this model: "The capital
    # of France is Paris." or a French ramble, by 0.08 in the first token's logits)
    session = LlmInference(real_model("smollm2-135m"), temperature=0.0).create_session()
    session.add_messages(QUESTION)
    assert choice.message.content == session.generate_response(max_new_tokens=40)
    assert choice.finish_reason == ("length" if session.last_stats.finish_reason == "length" else "stop")
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_client_chat_stream_equals_the_plain_reply(client):
    plain = client.chat.completions.create(
        model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=40
    )
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=QUESTION,
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == plain.choices[0].message.content and finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_openai_client_completions_plain_and_streamed(client):
    plain = client.completions.create(
        model="smollm2-135m", prompt="The capital of France is", temperature=0, max_tokens=8
    )
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 8
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="smollm2-135m", prompt="The capital of France is", temperature=0, max_tokens=8, stream=True
        )
    )
    assert streamed == plain.choices[0].text and "Paris" in streamed


def test_stop_sequences_cut_the_text(client):
    reply = client.completions.create(
        model="smollm2-135m", prompt="Count: 1, 2, 3,", temperature=0, max_tokens=30, stop=[", 6"]
    )
    assert reply.choices[0].finish_reason == "stop" and ", 6" not in reply.choices[0].text
    assert "5" in reply.choices[0].text


def test_models_and_health(client, smol_server):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    assert httpx.get(smol_server.url + "/health").json()["status"] == "ok"


def _stream_text(url: str, body: dict) -> tuple[str, str, bool]:
    """(text, finish_reason, ended with [DONE]) of one streamed completion."""
    text, finish, done = [], None, False
    with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["text"])
            finish = choice["finish_reason"] or finish
    return "".join(text), finish, done


def test_eight_clients_three_streams_each_get_only_their_own_tokens(tiny_server):
    requests = [
        {"prompt": f"Client {c} asks question {r}", "seed": 10 * c + r, "temperature": 0.9, "max_tokens": 24}
        for c in range(8)
        for r in range(3)
    ]

    def client_run(c):
        return [_stream_text(tiny_server.url, requests[3 * c + r]) for r in range(3)]

    with ThreadPoolExecutor(8) as pool:
        concurrent = [result for results in pool.map(client_run, range(8)) for result in results]
    for (text, finish, done), body in zip(concurrent, requests):
        assert (
            done and finish in ("stop", "length") and (text or finish == "stop")
        )  # empty: a stop token came first
        assert (text, finish, done) == _stream_text(
            tiny_server.url, body
        )  # alone, the same request gives the same
    assert sum(bool(text) for text, _, _ in concurrent) >= len(requests) - 2


def test_a_client_that_disconnects_frees_the_server(smol_server):
    body = {
        "prompt": "Write a very long story about the sea.",
        "max_tokens": 400,
        "stream": True,
        "temperature": 0.8,
    }
    with httpx.stream("POST", smol_server.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines)]
    assert any(line.startswith("data: ") for line in received)
    start = time.time()
    reply = httpx.post(
        smol_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60
    )
    assert reply.status_code == 200 and time.time() - start < 15  # 400 tokens would take far longer
    assert httpx.get(smol_server.url + "/health").json()["queued"] == 0


# ---- error responses (in-process client: no socket needed) ---------------------------------------


@pytest.fixture(scope="module")
def app_client(tiny):
    from starlette.testclient import TestClient

    app = create_app(LlmInference(tiny("llama")[2]), "tiny", context_size=64, api_key=None)
    with TestClient(app) as c:
        yield c


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"max_tokens": 4}).encode(), 400, "'messages'"),
        (json.dumps(CHAT | {"model": "gpt-4"}).encode(), 404, "does not exist"),
        (json.dumps({"messages": [{"role": "user", "content": "word " * 200}]}).encode(), 400, "context"),
        (json.dumps(CHAT | {"temperature": 5}).encode(), 400, "'temperature'"),
        (json.dumps(CHAT | {"top_p": 0}).encode(), 400, "'top_p'"),
        (json.dumps(CHAT | {"max_tokens": 0}).encode(), 400, "'max_tokens'"),
        (json.dumps(CHAT | {"n": 2}).encode(), 400, "n=1"),
        (json.dumps(CHAT | {"stop": 5}).encode(), 400, "'stop'"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "role"),
        (b'{"messages": "' + b"x" * (2 << 20) + b'"}', 413, "larger than"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
        (
            json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}).encode(),
            400,
            "'text' must be a string",
        ),
        (b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 4}', 400, "lone surrogate"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}', 400, "lone surrogate"),
        (json.dumps(CHAT | {"temperature": 1e-300}).encode(), 200, None),
    ],
)
def test_bad_requests_get_openai_errors_with_the_right_status(app_client, body, status, needle):
    response = app_client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    if needle is None:  # accepted: a tiny temperature used to give NaN probabilities and a 500
        assert response.json()["choices"][0]["message"]["content"] is not None
        return
    error = response.json()["error"]
    assert needle in error["message"] and error["type"]


def test_completions_validate_the_prompt(app_client):
    response = app_client.post("/v1/completions", json={"prompt": 42})
    assert response.status_code == 400 and "'prompt'" in response.json()["error"]["message"]
    response = app_client.post(
        "/v1/completions", content=b'{"prompt": "x\\udc00"}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "lone surrogate" in response.json()["error"]["message"]


def test_api_key_is_required_when_set(tiny):
    from starlette.testclient import TestClient

    app = create_app(LlmInference(tiny("llama")[2]), "tiny", context_size=64, api_key="sesame")
    with TestClient(app) as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 401
        assert c.get("/v1/models").status_code == 401
        ok = c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_chat_page_is_served_and_renders_model_text_as_text(app_client):
    page = app_client.get("/")
    assert page.status_code == 200 and "<textarea" in page.text
    script = app_client.get("/app.js").text
    assert "textContent" in script and "innerHTML" not in script  # no HTML from the model, ever
    assert "http" not in page.text.replace("http-equiv", "")  # nothing loaded from elsewhere


# ---- the chat page in a real browser ------------------------------------------------------------


@pytest.mark.browser
def test_chat_page_streams_and_stops_in_chromium(smol_server):
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=args)
        page = browser.new_page()
        page.goto(smol_server.url + "/")
        page.fill("#max-tokens", "300")
        page.fill("#prompt", "Tell me a long story about a lighthouse keeper <img src=x onerror=alert(1)>")
        page.press("#prompt", "Enter")
        reply = page.locator(".message.assistant").last
        page.wait_for_function(
            "document.querySelector('.message.assistant').textContent.length > 20", timeout=60000
        )
        page.screenshot(path=str(ARTIFACTS / "chat-page-streaming.png"))
        page.click("#stop")
        page.wait_for_function(
            "document.querySelector('.message.assistant').dataset.state === 'stopped'", timeout=10000
        )
        assert page.locator("#send").is_enabled()
        assert "<img" in page.locator(".message.user").first.text_content()  # shown as text
        assert page.locator(".message img").count() == 0
        assert "tok/s" in page.locator("#speed").text_content()
        stopped_at = len(reply.text_content())
        time.sleep(1.0)
        assert len(reply.text_content()) == stopped_at  # nothing arrives after Stop
        page.screenshot(path=str(ARTIFACTS / "chat-page-stopped.png"))
        browser.close()


def test_chat_page_asks_for_the_api_key_and_then_works_in_chromium(tiny):
    """With --api-key the page used to fail every request: it now shows a key field on the 401,
    sends the key, and does not resend the failed turn."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    server = LiveServer(
        create_app(LlmInference(tiny("llama")[2]), "tiny", context_size=256, api_key="s3cret")
    )
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=str(chromium), headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#api-key", state="visible", timeout=10000)  # /v1/models answered 401
            page.fill("#max-tokens", "8")
            page.fill("#prompt", "Hello")
            page.press("#prompt", "Enter")
            page.wait_for_selector(".message.error", timeout=10000)
            assert "API key" in page.locator(".message.error").text_content()
            page.fill("#api-key", "s3cret")
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.querySelector('#model').textContent === 'tiny'", timeout=10000)
            page.fill("#prompt", "Hello again")
            page.press("#prompt", "Enter")
            page.wait_for_function(
                "document.querySelector('.message.assistant:last-of-type') && "
                "[...document.querySelectorAll('.message.assistant')].pop().dataset.state === 'done'",
                timeout=30000,
            )
            browser.close()
    finally:
        server.stop()


# -- structured output and tools (a tiny random model: valid output is the grammar's doing) ---------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ALARM_TOOL = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
            "required": ["hour"],
        },
    },
}


@pytest.fixture(scope="module")
def tools_server(tiny):
    llm = LlmInference(tiny("llama", max_position_embeddings=2048)[2])
    server = LiveServer(create_app(llm, "tiny", context_size=2048))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tools_client(tools_server):
    from openai import OpenAI

    return OpenAI(base_url=tools_server.url + "/v1", api_key="unused")


def test_response_format_json_schema_strict(tools_client):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["name", "tags"],
        "additionalProperties": False,
    }
    for temperature in (0.0, 1.0):
        r = tools_client.chat.completions.create(
            model="tiny",
            messages=QUESTION,
            max_tokens=300,
            temperature=temperature,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": schema, "strict": True},
            },
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # any object: a random model's strings end only when it samples a quote, so more room than above
    r = tools_client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=1500, response_format={"type": "json_object"}
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_openai_parse_helper_with_a_pydantic_model(tools_client):
    from typing import Literal

    import pydantic

    class Forecast(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")  # a random model never ends a free string,
        city: str = pydantic.Field(max_length=20)  # so none is left open-ended
        unit: Literal["C", "F"]
        high: int

    r = tools_client.beta.chat.completions.parse(
        model="tiny", messages=QUESTION, max_tokens=300, response_format=Forecast
    )
    assert isinstance(r.choices[0].message.parsed, Forecast)


def test_completions_take_a_response_format(tools_server):
    body = {"prompt": "x", "max_tokens": 20, "response_format": {"type": "regex", "regex": "[0-9]{3}"}}
    r = httpx.post(tools_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and re.fullmatch("[0-9]{3}", r.json()["choices"][0]["text"])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls_plain_and_streamed(tools_client, choice):
    import jsonschema

    kwargs = dict(
        model="tiny",
        messages=QUESTION,
        tools=[WEATHER_TOOL, ALARM_TOOL],
        tool_choice=choice,
        max_tokens=300,
        temperature=0.0,
    )
    r = tools_client.chat.completions.create(**kwargs)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    (call,) = r.choices[0].message.tool_calls
    tool = {t["function"]["name"]: t for t in (WEATHER_TOOL, ALARM_TOOL)}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    # streamed: OpenAI's deltas (id and name first, then the arguments), assembled by the client
    with tools_client.beta.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert (streamed.function.name, json.loads(streamed.function.arguments)) == (
        call.function.name,
        json.loads(call.function.arguments),
    )


def test_tool_result_round_trip(tools_client):
    first = tools_client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=300
    )
    call = first.choices[0].message.tool_calls[0]
    messages = QUESTION + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    for tool_choice in ("auto", "none"):
        r = tools_client.chat.completions.create(
            model="tiny", messages=messages, tools=[WEATHER_TOOL], tool_choice=tool_choice, max_tokens=40
        )
        message = r.choices[0].message
        assert (message.content is not None) or message.tool_calls
    # the same conversation without tools (the model answers from the tool's result)
    r = tools_client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "uniqueItems",
        ),
        ({"response_format": {"type": "regex", "regex": "(("}}, "regex"),
        ({"response_format": {"type": "grammar", "grammar": "start: ((("}}, "grammar"),
        ({"response_format": {"type": "yaml"}}, "response_format type"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "function.name"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}, "cannot be combined"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 3}}]}]},
            "function.name",
        ),
    ],
)
def test_bad_structured_requests_are_400s(app_client, extra, needle):
    response = app_client.post("/v1/chat/completions", json=CHAT | extra)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]


@pytest.mark.parametrize("api_key, examples", [(None, 60), ("sekret", 15)])
def test_schemathesis_finds_no_5xx_and_no_answer_unlike_the_openapi_description(tiny, api_key, examples):
    """Requests generated from /openapi.json, valid and invalid ones, against a live server: none
    gets a 5xx, and every status, content type, header and body is one the description documents."""
    import subprocess
    import sys

    server = LiveServer(create_app(LlmInference(tiny("llama")[2]), "tiny", context_size=64, api_key=api_key))
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,"
    checks += "response_schema_conformance,response_headers_conformance"
    command = [
        str(Path(sys.executable).parent / "st"),
        "run",
        server.url + "/openapi.json",
        "--checks",
        checks,
    ]
    command += ["--mode", "all", "--max-examples", str(examples), "--seed", "1", "--no-color"]
    if api_key:
        command += ["--header", f"Authorization: Bearer {api_key}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert counts and int(counts[1]) > 100 and counts[1] == counts[2], result.stdout[-2000:]


def test_the_openapi_description_states_this_server_s_model_context_and_auth_and_405s_name_the_method(tiny):
    from starlette.testclient import TestClient

    llm = LlmInference(tiny("llama")[2])
    with TestClient(create_app(llm, "tiny", context_size=64, api_key="sekret")) as client:
        doc = client.get("/openapi.json").json()
        wrong = client.get("/v1/chat/completions")
    assert (
        doc["openapi"].startswith("3.1")
        and "serving tiny with a context of 64 tokens" in doc["info"]["description"]
    )
    request = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert request["properties"]["max_tokens"]["maximum"] == 64
    assert (
        doc["security"] == [{"apiKey": []}] and "401" in doc["paths"]["/v1/completions"]["post"]["responses"]
    )
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["message"] == "GET is not allowed here; use POST"
