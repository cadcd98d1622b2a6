"""Constrained decoding: the grammar engines compared, and what a token mask costs next to a decode step.

    python benchmarks/structured_bench.py                 # both real models, the 50 test schemas
    python benchmarks/structured_bench.py --engines       # also xgrammar (pip install xgrammar; needs torch)

For each model: the 50 schemas of tests/fixtures/json_schemas.json are answered greedily with
pocketlm (llguidance masks), every output checked with `jsonschema`; the token sequences are then
replayed through each engine, timing the mask of every step alone (median and p95 per token) and
the compile of every schema (llguidance's mask time includes applying the mask to the logits;
xgrammar's is its bitmask fill alone). The decode step is timed on the same model without a constraint; the
mask's share of it is the figure the target is about (<= 10 %).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from compare_llamacpp import machine

from pocketlm import LlmInference
from pocketlm.structured import JSON_OPTIONS, Constraint, json_grammar

SCHEMAS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "json_schemas.json"


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def answer_all(llm, cases, temperature):
    """Each case answered under its schema; returns (token ids per case, invalid count, seconds)."""
    import jsonschema

    runs, invalid = [], 0
    start = time.perf_counter()
    for case in cases:
        session = llm.create_session(temperature=temperature, top_k=0)
        session.add_messages([{"role": "user", "content": case["prompt"]}])
        text = session.generate_response(max_new_tokens=256, response_format=case["schema"])
        try:
            jsonschema.validate(json.loads(text), case["schema"])
        except (ValueError, jsonschema.ValidationError):
            invalid += 1
            print(f"  invalid: {case['description']}: {text[:120]!r}")
        runs.append(list(session.last_stats.token_ids))
    return runs, invalid, time.perf_counter() - start


def time_llguidance(llm, cases, runs):
    vocabulary = llm.model.grammar_vocabulary
    logits = np.zeros(llm.model.model.vocab_size, np.float32)
    compile_s, mask_s = [], []
    for case, ids in zip(cases, runs):
        start = time.perf_counter()
        constraint = Constraint(vocabulary, json_grammar(case["schema"]))
        compile_s.append(time.perf_counter() - start)
        for token in ids:
            start = time.perf_counter()
            masked = constraint.mask(logits)  # the bitmask, and applied to a row of logits
            mask_s.append(time.perf_counter() - start)
            if not np.isfinite(masked[token]):
                break  # a stop token after the grammar ended
            constraint.accept(token)
    return compile_s, mask_s


def time_xgrammar(llm, cases, runs):
    import xgrammar as xgr

    tok = llm.tokenizer
    vocab = [b"" if i in tok.control_ids else t for i, t in enumerate(tok.token_bytes())]
    n_vocab = llm.model.model.vocab_size
    start = time.perf_counter()
    info = xgr.TokenizerInfo(
        vocab,
        vocab_type=xgr.VocabType.RAW,
        vocab_size=n_vocab,
        stop_token_ids=sorted(tok.stop_ids),
        add_prefix_space=False,
    )
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    setup = time.perf_counter() - start
    bitmask = xgr.allocate_token_bitmask(1, n_vocab)
    compile_s, mask_s = [], []
    for case, ids in zip(cases, runs):
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(
            json.dumps(case["schema"]),
            any_whitespace=False,
            separators=(JSON_OPTIONS["item_separator"], JSON_OPTIONS["key_separator"]),
        )
        matcher = xgr.GrammarMatcher(compiled)
        compile_s.append(time.perf_counter() - start)
        for token in ids:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            mask_s.append(time.perf_counter() - start)
            if not matcher.accept_token(token):
                break
    return setup, compile_s, mask_s


def decode_step_seconds(llm, n=64):
    session = llm.create_session(temperature=0.0)
    session.add_query_chunk("Once upon a time")
    session.generate_response(max_new_tokens=n)
    return 1 / session.last_stats.decode_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument(
        "--engines", action="store_true", help="also time xgrammar on the same token sequences"
    )
    parser.add_argument(
        "--sampled", action="store_true", help="also answer at temperature 1.0 (validity only)"
    )
    args = parser.parse_args()
    cases = json.loads(SCHEMAS.read_text())
    print(f"CPU: {machine()}; {len(cases)} schemas")
    for name in args.models:
        llm = LlmInference(name, max_tokens=1024)
        start = time.perf_counter()
        vocabulary = llm.model.grammar_vocabulary
        vocab_s = time.perf_counter() - start
        runs, invalid, seconds = answer_all(llm, cases, 0.0)
        n_tokens = sum(len(r) for r in runs)
        valid = len(cases) - invalid
        print(
            f"\n{name} (vocabulary {vocabulary.size}): greedy: {valid}/{len(cases)} valid, "
            f"{n_tokens} tokens in {seconds:.1f} s"
        )
        if args.sampled:
            _, invalid_t, seconds_t = answer_all(llm, cases, 1.0)
            print(f"  temperature 1.0: {len(cases) - invalid_t}/{len(cases)} valid ({seconds_t:.1f} s)")
        step = statistics.median(decode_step_seconds(llm) for _ in range(3))
        compile_s, mask_s = time_llguidance(llm, cases, runs)
        rows = [("llguidance", vocab_s, compile_s, mask_s)]
        if args.engines:
            setup, x_compile, x_mask = time_xgrammar(llm, cases, runs)
            rows.append(("xgrammar", setup, x_compile, x_mask))
        print(f"  decode step without a constraint: {step * 1e3:.2f} ms")
        print(
            f"  {'engine':<11} {'vocab setup s':>13} {'compile ms med/p95/max':>24} {'mask us med/p95':>16} "
            f"{'mask / step':>11}"
        )
        for engine, setup_s, comp, mask in rows:
            compile_ms = [percentile(comp, 50) * 1e3, percentile(comp, 95) * 1e3, max(comp) * 1e3]
            mask_us = [percentile(mask, 50) * 1e6, percentile(mask, 95) * 1e6]
            c50, c95, cmax = compile_ms
            print(
                f"  {engine:<11} {setup_s:13.2f} {c50:8.1f}/{c95:6.1f}/{cmax:7.1f} "
                f"{mask_us[0]:8.0f}/{mask_us[1]:7.0f} {statistics.mean(mask) / step:10.1%}"
            )


if __name__ == "__main__":
    main()
