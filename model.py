"""LLaMA 2 in one file (Meta's github.com/facebookresearch/llama, with its checkpoint names), read as a stack of
nested language models: the first n blocks, then the *shared* final norm and output head, form a model for every n
(SoFT, arXiv 2309.08968). forward(tokens, n_layers=n) runs one; forward(tokens, exits=[...]) returns the hidden
states at several depths from one pass; head() is where every depth meets the shared norm and head.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    # field names are those of Meta's params.json
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouping)
    vocab_size: int = 32000
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    hidden_dim: int | None = None  # the feed-forward width given directly (Hugging Face's intermediate_size)

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:  # Meta's rule: 2/3 of 4 * dim, times the multiplier, rounded up to multiple_of
            hidden = int(int(2 * 4 * self.dim / 3) * (self.ffn_dim_multiplier or 1))
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# the shapes Meta released; "tiny" is the demo that trains on a CPU in minutes
PRESETS = {
    "tiny": dict(dim=128, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                ffn_dim_multiplier=1.3),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps), in float32 whatever the activation dtype, then the weight, as Meta does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None):
    """cos and sin of every (position, frequency) angle, each (max_seq_len, 1, head_dim) in float32: each angle twice,
    once for each dim of the pair it rotates, sin negated for the first (apply_rope's form), and a 1 for the heads."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)  # (max_seq_len, head_dim/2)
    cos = angles.cos().repeat_interleave(2, -1)
    sin = torch.stack((-angles.sin(), angles.sin()), -1).flatten(-2)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H, head_dim) by position; cos, sin: rope_tables' rows (T, 1, head_dim), or (B, T, 1, head_dim)
    when each row has positions of its own. Meta's layout: dims (2i, 2i+1) form one rotating pair (x0, x1), which
    becomes (x0 cos - x1 sin, x1 cos + x0 sin): x cos + (x with each pair swapped) (-sin, sin)."""
    h = x.float()
    swapped = h.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in each pair
    return (h * cos + swapped * sin).type_as(x)


class KVCache(nn.Module):  # keys and values of one layer, written in place at the positions being decoded
    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k, v):
        """Store k, v (B, n_kv_heads, T, head_dim) at start_pos.. and return all keys and values up to their end
        (entries past it are stale, a rejected draft's say, and never read)."""
        end = start_pos + k.size(2)
        self.k[:, :, start_pos:end], self.v[:, :, start_pos:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache = None  # a KVCache while decoding, None while training

    def forward(self, x, cos, sin, start_pos: int, mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, head_dim)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # every key so far: (B, n_kv_heads, start_pos + T, head_dim)
        # query i sits at position start_pos + i and sees the keys up to there: causal from position 0, a shifted
        # triangle for a chunk on top of the cache, every key for a single new token
        # (is_causal is a plain bool of start_pos: compiled with a symbolic length T, a test of T would break the graph)
        causal = mask is None and start_pos == 0
        if mask is None and start_pos > 0 and T > 1:
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(start_pos)
        # grouped-query attention: query heads h*g..h*g+g-1 (g = n_heads / n_kv_heads) share key/value head h.
        # enable_gqa computes what k.repeat_interleave(g, dim=1) and the same of v would give, without the copies
        gqa = self.n_kv_heads != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos: int, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)  # shared by every exit
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # shared by every exit
        self.init_rope()
        # the weights torch gives the modules above are placeholders: a fresh model's come from fresh_weights
        # (below), a trained one's from load_llama.py

    def init_rope(self, device=None):
        """(Re)compute the rotary tables; needed after building on the meta device, as they are not saved."""
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, start_pos: int = 0, n_layers: int | None = None, exits: list[int] | None = None):
        """Logits (B, T, vocab) of the depth-n_layers model (default: all) for tokens (B, T) at positions start_pos..;
        with exits=[e1, ..., ek], the hidden states (B, T, dim) after blocks e1..ek from one pass instead."""
        assert start_pos + tokens.size(1) <= self.args.max_seq_len, "sequence longer than max_seq_len"
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if exits is None:
            depth = n_layers or self.args.n_layers
            return self.head(self.run_layers(h, start_pos, 0, depth), depth)
        assert all(a < b for a, b in zip(exits, exits[1:])), f"exits {exits} must be strictly increasing"
        hidden = []
        for first, last in zip([0] + exits, exits):
            h = self.run_layers(h, start_pos, first, last)
            hidden.append(h)
        return hidden

    def run_layers(self, h, start_pos: int, first: int, last: int, positions=None, mask=None):
        """Blocks first+1..last on hidden states h (B, T, dim) at positions start_pos.. (decoding/ passes rows with
        positions of their own (B, T), and their attention mask)."""
        T = h.size(1)
        if positions is None:
            cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for layer in self.layers[first:last]:
            h = layer(h, cos, sin, start_pos, mask)
        return h

    def exit_head(self, depth: int | None = None):
        """(norm, output) the hidden states after `depth` blocks read through: the same two modules at every depth
        (variants/exit_heads.py gives exits heads of their own)."""
        return self.norm, self.output

    def head(self, h, depth: int | None = None):
        norm, output = self.exit_head(depth)
        return output(norm(h))  # the logits of depth `depth` (default: the last)

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None):
        w, args = self.output.weight, self.args  # a KV cache in every layer, in the weights' dtype and device
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_seq_len or args.max_seq_len, args.n_kv_heads,
                                            args.head_dim, w.dtype, w.device)

    def drop_cache(self):
        for layer in self.layers:
            layer.attention.cache = None


def default_exits(n_layers: int) -> list[int]:
    """Up to 8 evenly spaced exits ending at the last layer, none below 30% depth (13B: 12, 16, ..., 40)."""
    first = math.ceil(0.3 * n_layers)
    step = max(1, math.ceil((n_layers - first) / 7))
    return list(range(n_layers, first - 1, -step))[:8][::-1]


def init_weights(name: str, shape, n_layers: int, generator=None) -> torch.Tensor:
    """A fresh float32 value for parameter `name`: N(0, 0.02), residual projections scaled by 1/sqrt(2L), norms 1."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    residual = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
    std = 0.02 / math.sqrt(2 * n_layers) if residual else 0.02
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def fresh_weights(model: Transformer, seed: int):
    """A fresh model's weights, (name, tensor) one parameter at a time, drawn from the seed (GPT-2's init, as in
    nanoGPT). load_llama.load_initial_weights copies them in: under torchrun each process keeps only its shard, so
    the whole model never has to exist in one place."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        yield name, init_weights(name, p.shape, model.args.n_layers, g)
