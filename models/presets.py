"""GPT and Llama size presets: shapes only, so any size can be planned without allocating.

The Megatron-LM rows are Table 1 of Narayanan et al., SC'21 (sequence 2048, vocabulary
51200, MLP 4x hidden); GPT-3 175B is Brown et al. 2020 with the vocabulary padded to
51200 as Megatron does. The Llama 3 rows are Meta's Llama 3 model card
(github.com/meta-llama/llama3, MODEL_CARD.md: 8B and 70B, GQA, context 8192) and Table 3
of "The Llama 3 Herd of Models" (Grattafiori et al. 2024: layers, width, FFN width, heads,
8 key/value heads, RoPE base 500000); the vocabulary 128256 (the paper's 128000 tokens
plus 256 special ones) and RMSNorm epsilon 1e-5 are those of the released params.json.
"""

from __future__ import annotations

import dataclasses


def _out_std(layers: int) -> float:
    """Init scale of residual-branch output projections (GPT-2: 0.02 / sqrt(2 layers))."""
    return 0.02 / (2 * layers) ** 0.5


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int
    length: int
    embed: int
    heads: int
    layers: int
    mlp: int = 0
    head_dim: int = 0
    positions: str = "learned"
    tied: bool = True

    def __post_init__(self) -> None:
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', got {self.positions!r}")
        if not self.head_dim:
            if self.embed % self.heads:
                raise ValueError(f"embed {self.embed} is not divisible by heads {self.heads}; "
                                 "give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.embed // self.heads)
        if not self.mlp:
            object.__setattr__(self, "mlp", 4 * self.embed)

    @property
    def out_std(self) -> float:
        return _out_std(self.layers)

    @property
    def num_params(self) -> int:
        attn = 4 * self.embed * self.heads * self.head_dim
        mlp = 2 * self.embed * self.mlp + self.mlp + self.embed
        norms = 4 * self.embed
        block = attn + mlp + norms
        embed = self.vocab * self.embed * (1 if self.tied else 2)
        positions = self.length * self.embed if self.positions == "learned" else 0
        return self.layers * block + embed + positions + 2 * self.embed

    def flops_per_token(self, length: int | None = None) -> float:
        """Model FLOPs of forward + backward per token (no recomputation counted):
        3 x 2 x (every matmul's multiply-adds), attention scores and values included."""
        length = length or self.length
        proj = 4 * self.embed * self.heads * self.head_dim
        scores = 2 * length * self.heads * self.head_dim
        mlp = 2 * self.embed * self.mlp
        logits = self.embed * self.vocab
        return 6.0 * (self.layers * (proj + scores + mlp) + logits)


def _megatron(heads: int, hidden: int, layers: int) -> GPTConfig:
    return GPTConfig(vocab=51200, length=2048, embed=hidden, heads=heads, layers=layers)


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab=256, length=64, embed=64, heads=8, layers=2),
    "small": GPTConfig(vocab=256, length=128, embed=128, heads=8, layers=4),
    "gpt3-125m": GPTConfig(vocab=51200, length=2048, embed=768, heads=12, layers=12),
    "gpt3-1.3b": GPTConfig(vocab=51200, length=2048, embed=2048, heads=16, layers=24),
    "gpt3-175b": GPTConfig(vocab=51200, length=2048, embed=12288, heads=96, layers=96),
    "megatron-1.7b": _megatron(24, 2304, 24),
    "megatron-3.6b": _megatron(32, 3072, 30),
    "megatron-7.5b": _megatron(32, 4096, 36),
    "megatron-18b": _megatron(48, 6144, 40),
    "megatron-39b": _megatron(64, 8192, 48),
    "megatron-76b": _megatron(80, 10240, 60),
    "megatron-146b": _megatron(96, 12288, 80),
    "megatron-310b": _megatron(128, 16384, 96),
    "megatron-530b": _megatron(128, 20480, 105),
    "megatron-1t": _megatron(160, 25600, 128),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-style decoder: RMSNorm, rotary positions, grouped-query attention (`heads`
    query heads share `kv_heads` key/value heads), SwiGLU MLP, untied output head.
    `blocks`: "stacked" (one module with a leading `layers` axis, scanned: compile time
    does not grow with depth) or "unrolled" (a list of blocks applied in a Python loop)."""

    vocab: int
    length: int
    embed: int
    heads: int
    kv_heads: int
    layers: int
    mlp: int
    head_dim: int = 0  # 0: embed // heads
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    blocks: str = "stacked"

    def __post_init__(self) -> None:
        if self.blocks not in ("stacked", "unrolled"):
            raise ValueError(f"blocks must be 'stacked' or 'unrolled', got {self.blocks!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads "
                             f"{self.kv_heads}; each key/value head serves a group of heads")
        if not self.head_dim:
            if self.embed % self.heads:
                raise ValueError(f"embed {self.embed} is not divisible by heads {self.heads}; "
                                 "give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.embed // self.heads)

    @property
    def out_std(self) -> float:
        return _out_std(self.layers)

    @property
    def num_params(self) -> int:
        attn = self.embed * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.embed * self.mlp  # gate, up, down; no biases
        block = attn + mlp + 2 * self.embed  # two RMSNorm scales
        return self.layers * block + 2 * self.vocab * self.embed + self.embed

    def flops_per_token(self, length: int | None = None) -> float:
        """Model FLOPs of forward + backward per token (no recomputation counted):
        3 x 2 x (every matmul's multiply-adds), attention scores and values included."""
        length = length or self.length
        proj = self.embed * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        scores = 2 * length * self.heads * self.head_dim
        mlp = 3 * self.embed * self.mlp
        logits = self.embed * self.vocab
        return 6.0 * (self.layers * (proj + scores + mlp) + logits)


def _llama3(embed: int, heads: int, layers: int, mlp: int) -> LlamaConfig:
    return LlamaConfig(vocab=128256, length=8192, embed=embed, heads=heads, kv_heads=8,
                       layers=layers, mlp=mlp, rope_base=500000.0)


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama-tiny": LlamaConfig(vocab=128, length=16, embed=32, heads=4, kv_heads=2, layers=2,
                              mlp=64),
    "llama3-8b": _llama3(embed=4096, heads=32, layers=32, mlp=14336),
    "llama3-70b": _llama3(embed=8192, heads=64, layers=80, mlp=28672),
}


def _lookup(table: dict, family: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {family} preset {name!r}; choose one of {', '.join(table)}")
    return table[name]


def preset(name: str) -> GPTConfig:
    return _lookup(PRESETS, "GPT", name)


def llama_preset(name: str) -> LlamaConfig:
    return _lookup(LLAMA_PRESETS, "Llama", name)
