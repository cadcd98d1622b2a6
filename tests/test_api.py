"""The LLM Inference API: responses, streaming, callbacks, seeds, sessions and their KV reuse."""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm import ContextLengthError, InvalidOptionError, LlmInference, load


@pytest.fixture(scope="module")
def smol(real_model):
    return LlmInference(real_model("smollm2-135m"), max_tokens=256, temperature=0.0)


@pytest.fixture(scope="module")
def tiny_llm(tiny):
    return LlmInference(tiny("llama")[2], max_tokens=128, temperature=0.8, top_k=20, random_seed=3)


def test_real_model_writes_a_sensible_haiku(smol):
    """Three lines about the sea. Whether this 135M model stops after them under greedy decoding is
    a near tie that any change of arithmetic tips: llama.cpp writes one line and stops; with float32
    prompts ours wrote four lines and stopped; with int8 prompts (the default) the same first
    lines, then "A reminder of ..." lines until the token limit."""
    reply = smol.generate_response("Write a haiku about the sea.")
    lines = [line for line in reply.strip().splitlines() if line.strip()][:3]
    assert len(lines) == 3 and all(2 <= len(line.split()) <= 12 for line in lines), reply
    words = " ".join(lines).lower()
    assert any(w in words for w in ("sea", "wave", "ocean", "shore", "tide")), reply


def test_stream_and_callback_give_the_same_text_as_a_plain_call(tiny_llm):
    plain = tiny_llm.generate_response("Hello", max_new_tokens=20)
    streamed = list(tiny_llm.generate_response_stream("Hello", max_new_tokens=20))
    calls = []
    tiny_llm.generate_response(
        "Hello", listener=lambda piece, done: calls.append((piece, done)), max_new_tokens=20
    )
    assert "".join(streamed) == plain and len(streamed) > 1
    assert "".join(p for p, _ in calls) == plain and calls[-1] == ("", True)
    assert not any(done for _, done in calls[:-1])


def test_same_seed_same_text_other_seed_other_text(tiny_llm):
    a = tiny_llm.generate_response("Once", max_new_tokens=24)
    assert tiny_llm.generate_response("Once", max_new_tokens=24) == a
    others = {tiny_llm.create_session(random_seed=s) for s in (1, 2)}
    texts = set()
    for session in others:
        session.add_query_chunk("Once")
        texts.add(session.generate_response(max_new_tokens=24))
    assert texts - {a}


def test_generation_stops_at_max_tokens_of_context(tiny):
    llm = LlmInference(tiny("llama")[2], max_tokens=40, temperature=0.0)
    session = llm.create_session()
    session.add_query_chunk("The lighthouse keeper")
    session.generate_response()
    assert session.last_stats.finish_reason == "length"
    assert len(session.tokens) == 40


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_session_follow_up_prefills_only_the_new_tokens_and_matches_a_replay_and_a_fresh_run(
    real_model, backend
):
    """A follow-up prefills only the new turn and equals a session that went through the same
    turns. On the reference backend it also equals a fresh run that prefills the whole
    conversation. The cpu backend's decode rounds activations to int8 blocks (kernels.intdot)
    and its prefill does not, so there a decoded answer and the same answer prefilled leave
    slightly different caches, and greedy text parts where two tokens are a near tie (as a
    llama.cpp conversation continued and the same conversation re-sent do)."""
    llm = LlmInference(real_model("smollm2-135m"), max_tokens=256, temperature=0.0, backend=backend)
    session = llm.create_session()
    first = session.chat("What is the capital of France?", max_new_tokens=40)
    before = len(session.tokens)
    second = session.chat("And of Italy?", max_new_tokens=40)
    assert 0 < session.last_stats.prompt_tokens < 20 < before  # only the new turn was prefilled
    replay = llm.create_session()
    assert replay.chat("What is the capital of France?", max_new_tokens=40) == first
    assert replay.chat("And of Italy?", max_new_tokens=40) == second
    if backend == "reference":
        fresh = llm.create_session()
        fresh.add_messages(
            [
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And of Italy?"},
            ]
        )
        assert fresh.generate_response(max_new_tokens=40) == second
        assert fresh.last_stats.prompt_tokens > before


def test_clone_continues_independently_from_the_same_state(tiny):
    llm = LlmInference(tiny("llama")[2], max_tokens=128, temperature=0.0)
    session = llm.create_session()
    session.add_query_chunk("Boats rock gently")
    session.generate_response(max_new_tokens=8)
    twin = session.clone()
    session.add_query_chunk(" in the harbour")
    twin.add_query_chunk(" in the harbour")
    assert session.generate_response(max_new_tokens=12) == twin.generate_response(max_new_tokens=12)
    twin.add_query_chunk(" and more")
    assert len(twin.tokens) > len(session.tokens)


def test_prompt_longer_than_max_tokens_is_a_clear_error(tiny):
    llm = LlmInference(tiny("llama")[2], max_tokens=16, temperature=0.0, use_chat_template=False)
    with pytest.raises(ContextLengthError, match="max_tokens=16"):
        llm.generate_response("word " * 40)


def test_a_chat_turn_that_does_not_fit_leaves_the_session_as_it_was(tiny):
    """The long message is refused; the next one is answered as by a session that never saw it."""
    llm = LlmInference(tiny("llama")[2], max_tokens=64, temperature=0.0)
    session, fresh = llm.create_session(), llm.create_session()
    with pytest.raises(ContextLengthError):
        session.chat("word " * 80, max_new_tokens=4)
    assert session.chat("Hi", max_new_tokens=6) == fresh.chat("Hi", max_new_tokens=6)
    assert session.tokens == fresh.tokens


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_max_new_tokens_must_be_a_positive_integer(tiny, value):
    llm = LlmInference(tiny("llama")[2], max_tokens=64, temperature=0.0)
    with pytest.raises(InvalidOptionError, match="max_new_tokens"):
        llm.generate_response("Hello", max_new_tokens=value)


def test_token_ids_outside_the_vocabulary_are_refused(tiny):
    session = LlmInference(tiny("llama")[2], max_tokens=64).create_session()
    for ids in ([-1], [10**9]):
        with pytest.raises(InvalidOptionError, match="token ids must be in"):
            session.add_token_ids(ids)
    assert session.tokens == []


@pytest.mark.parametrize("options", [dict(temperature=-1.0), dict(top_p=2.0), dict(max_tokens=0)])
def test_bad_options_are_rejected_at_construction(tiny, options):
    with pytest.raises(InvalidOptionError):
        LlmInference(tiny("llama")[2], **options)


def test_size_in_tokens_counts_the_tokenizer_output(smol):
    assert smol.size_in_tokens("Hello world") == len(smol.tokenizer.encode("Hello world"))


def test_low_level_logits_have_one_row_per_token(tiny):
    lm = load(tiny("llama")[2])
    logits = lm.logits([5, 6, 7])
    assert logits.shape == (3, lm.model.vocab_size) and logits.dtype == np.float32
    with pytest.raises(InvalidOptionError, match="token ids"):
        lm.logits([1, 10**6])


def test_a_cleared_cache_prefills_like_a_fresh_one(tiny):
    """What the web export does between its recorded passes: the same cache, every position forgotten."""
    from conftest import prompt_ids

    from pocketlm.engine import prefill

    model, _, gguf = tiny("gemma3")
    lm = load(gguf)
    ids = prompt_ids(model.config.vocab_size, 64, seed=8)
    used = lm.make_cache(64)
    prefill(lm, used, ids[:50])
    used.clear()
    assert used.offset == 0 and all((layer.positions == -1).all() for layer in used.layers)
    np.testing.assert_array_equal(prefill(lm, used, ids[50:]), prefill(lm, lm.make_cache(64), ids[50:]))
