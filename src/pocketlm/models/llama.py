"""Llama family (Llama 2/3, SmolLM2): pre-norm blocks, SwiGLU MLP, RoPE, grouped-query attention,
optional attention / MLP biases and Llama 3 RoPE scaling (llama.cpp's rope_freqs tensor).

llama.cpp's converter permutes the q/k rows of Llama checkpoints so that RoPE rotates adjacent
pairs; GGUF files of this architecture therefore use the non-NeoX rotation. Qwen 2/3 and Gemma
reuse these blocks with the NeoX rotation.
"""

from __future__ import annotations

from .base import Attention, CausalLM, DecoderArgs, GatedMLP, Norm, Weights


class TransformerBlock:
    def __init__(
        self,
        w: Weights,
        i: int,
        args: DecoderArgs,
        rope_neox: bool,
        activation: str,
        qk_norm: str | None = None,
    ):
        spec = args.attention_spec(rope_neox=rope_neox, qk_norm=qk_norm)
        self.attn_norm = Norm(w, f"blk.{i}.attn_norm", "rms", args.norm_eps)
        self.ffn_norm = Norm(w, f"blk.{i}.ffn_norm", "rms", args.norm_eps)
        self.attention = Attention(w, f"blk.{i}", spec, args.norm_eps)
        self.mlp = GatedMLP(w, f"blk.{i}", activation)

    def __call__(self, ops, x, positions, cache):
        x = x + self.attention(ops, self.attn_norm(ops, x), positions, cache)
        return x + self.mlp(ops, self.ffn_norm(ops, x))


class Model(CausalLM):
    rope_neox = False
    activation = "silu"
    qk_norm: str | None = None  # Qwen 3: "rms" (its q/k norm weights are then required)

    def __init__(self, args: DecoderArgs, w: Weights):
        self.args = args
        self.init_io(w, "rms", args.norm_eps)
        self.layers = [
            TransformerBlock(w, i, args, self.rope_neox, self.activation, self.qk_norm)
            for i in range(args.n_layers)
        ]


ARGS = DecoderArgs
