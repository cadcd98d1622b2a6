"""Record llama.cpp's answers for the real models, as fixtures for the parity tests.

Needs the `llamacpp` extra (llama-cpp-python) and the models (`pocketlm pull smollm2-135m
gemma3-270m`). Writes tests/fixtures/llamacpp_<model>.json with:
- token ids of tests/fixtures/varied.txt (with and without special-token parsing, and the chat
  rendering), as llama.cpp tokenizes them;
- the token ids of tests/fixtures/passage.txt and llama.cpp's top-1 next token at every position
  (teacher forcing) with its logit, for the quantized file evaluated as one batch and token by
  token (llama.cpp's two paths disagree with each other; the fixture records by how much), and
  for the file dequantized to f32 by `pocketlm convert --quant f32`, where llama.cpp computes
  without quantizing activations.

    python scripts/make_llamacpp_fixtures.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from llama_cpp import Llama

from pocketlm.convert import ConversionConfig, convert
from pocketlm.registry import resolve_model

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
MODELS = ("smollm2-135m", "gemma3-270m")
CHAT_TEXT = "<start_of_turn>user\nHi there!<end_of_turn>\n<|im_start|>user\nHello<|im_end|>\n"


def teacher_forced(path: Path, ids: list[int], batch: int = 512) -> np.ndarray:
    llm = Llama(
        str(path), n_ctx=1024, n_batch=batch, n_ubatch=batch, n_threads=2, logits_all=True, verbose=False
    )
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float32)


def record(name: str, workdir: Path) -> dict:
    path = resolve_model(name, auto_pull=True)
    llm = Llama(str(path), n_ctx=64, vocab_only=True, verbose=False)
    varied = (FIXTURES / "varied.txt").read_text(encoding="utf-8")
    passage = (FIXTURES / "passage.txt").read_text(encoding="utf-8")
    tokenize = lambda text, special: llm.tokenize(text.encode("utf-8"), add_bos=True, special=special)  # noqa: E731
    ids = tokenize(passage, False)
    batched, single = teacher_forced(path, ids), teacher_forced(path, ids, batch=1)
    f32_path = convert(path, workdir / f"{name}-f32.gguf", ConversionConfig(quant="f32"), progress=False)
    f32 = teacher_forced(f32_path, ids)
    f32_path.unlink()
    return {
        "model": name,
        "llama_cpp_python": __import__("llama_cpp").__version__,
        # add_bos=True adds BOS only where the model's tokenizer.ggml.add_bos_token says so
        "varied_ids": tokenize(varied, False),
        "varied_ids_special": tokenize(varied + CHAT_TEXT, True),
        "passage_ids": ids,
        "passage_top1": batched.argmax(axis=1).tolist(),
        "passage_top1_logit": batched.max(axis=1).round(4).tolist(),
        "passage_top1_token_by_token": single.argmax(axis=1).tolist(),
        "passage_f32_top1": f32.argmax(axis=1).tolist(),
        "passage_f32_top1_logit": f32.max(axis=1).round(4).tolist(),
    }


def main() -> None:
    for name in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            data = record(name, Path(tmp))
        out = FIXTURES / f"llamacpp_{name}.json"
        out.write_text(json.dumps(data) + "\n", encoding="utf-8")
        print(f"{out}: {len(data['varied_ids'])} varied ids, {len(data['passage_ids'])} passage positions")


if __name__ == "__main__":
    main()
