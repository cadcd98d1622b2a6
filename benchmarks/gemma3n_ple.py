"""Peak memory and speed of a Gemma 3n file with its per-layer embeddings (PLE) read from the file
per token, against the same file with the table loaded into RAM (`--ple-in-ram`).

No real Gemma 3n checkpoint is reachable here, so this builds a random one with transformers (the
test extra) whose per-layer table dominates, converts it, and runs `pocketlm bench` on it in fresh
processes, alternating the two modes.

    python benchmarks/gemma3n_ple.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def build_checkpoint(folder: Path, hidden: int, layers: int, per_layer: int) -> None:
    """A random Gemma 3n text model: a 262144-row per-layer table of `layers` x `per_layer` values,
    a 4096-token byte-level vocabulary for the rest."""
    import torch
    import transformers

    folder.mkdir(parents=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(["<eos>", *alphabet])}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), 4096)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    config = transformers.Gemma3nTextConfig(
        vocab_size=4096,
        vocab_size_per_layer_input=262144,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        hidden_size_per_layer_input=per_layer,
        num_kv_shared_layers=layers // 2 // 5 * 5,
        laurel_rank=16,
        sliding_window=128,
        activation_sparsity_pattern=[0.95] * 2 + [0.0] * (layers - 2),
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3nForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.ndim == 1 else 0.0, 0.05)
    model.save_pretrained(folder)


def bench(path: Path, *flags: str, prompt: int = 128, gen: int = 64) -> dict:
    """`pocketlm bench --json` on `path` in a fresh process."""
    cmd = [sys.executable, "-m", "pocketlm", "bench", str(path), "--prompt-tokens", str(prompt)]
    out = subprocess.run(
        [*cmd, "--gen-tokens", str(gen), "--json", *flags], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--per-layer", type=int, default=128, help="PLE width per layer (real models: 256)")
    parser.add_argument("--quant", default="q8_0")
    args = parser.parse_args()

    from pocketlm import ConversionConfig, convert, load

    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp) / "hf", args.hidden, args.layers, args.per_layer)
        path = convert(Path(tmp) / "hf", Path(tmp) / "model.gguf", ConversionConfig(quant=args.quant))
        lm = load(path)
        table = lm.file.tensors["per_layer_token_embd.weight"]
        print(
            f"file {path.stat().st_size / 1e6:.0f} MB, per-layer table {table.nbytes / 1e6:.0f} MB "
            f"({table.shape[0]} x {table.shape[1]}, {table.type.name})"
        )
        del lm
        runs = {"streamed": [], "in RAM": []}
        for _ in range(args.rounds):
            runs["streamed"].append(bench(path))
            runs["in RAM"].append(bench(path, "--ple-in-ram"))
    first = runs["streamed"][0]
    print(
        f"parameters: {first['params_resident'] / 1e6:.1f} M in memory, "
        f"{first['params_streamed'] / 1e6:.1f} M read from storage"
    )
    print(
        f"{'PLE':<10} {'peak RSS MiB':>13} {'prefill tok/s':>14} {'decode tok/s':>13}   (medians of {args.rounds})"
    )
    for mode, results in runs.items():
        med = {
            k: statistics.median(r[k] for r in results)
            for k in ("peak_rss_mb", "prefill_tokens_per_second", "decode_tokens_per_second")
        }
        print(
            f"{mode:<10} {med['peak_rss_mb']:>13.0f} {med['prefill_tokens_per_second']:>14.1f} "
            f"{med['decode_tokens_per_second']:>13.1f}"
        )


if __name__ == "__main__":
    main()
