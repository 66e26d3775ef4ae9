"""LLaMA 2 in one file, read as a stack of nested language models.

The network follows Meta's reference implementation (github.com/facebookresearch/llama, model.py): RMSNorm,
rotary embeddings in Meta's interleaved layout, grouped-query attention, a SwiGLU feed-forward with Meta's
hidden-size rule, and Meta's checkpoint names for every parameter. Sorted Fine-Tuning (SoFT, arXiv 2309.08968)
reads it as many models at once: the first n blocks followed by the *shared* final norm and the *shared*
output head form a language model for every n. `forward(tokens, n_layers=n)` runs that sub-model,
`forward(tokens, exits=[...])` returns the hidden states at several depths from one pass, and `head()` is the
one place where every depth meets the shared norm and head.
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
    hidden_dim: int | None = None  # feed-forward width given directly (Hugging Face's intermediate_size)
    # SoFT's own: False reads the exits below the last through the shared head without the final norm (the
    # paper's question whether the norm is needed); Meta's and Hugging Face's checkpoints have it
    exit_norm: bool = True

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# the shapes Meta released; "tiny" is the demo that trains on a CPU in minutes (its vocabulary comes from
# the tokenizer it is trained with)
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
    """cos and sin of every (position, frequency) angle, each (max_seq_len, head_dim // 2), in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H, head_dim) by position: cos, sin (T, head_dim/2), or (B, T, head_dim/2) when each row has
    positions of its own. Meta's layout: dims (2i, 2i+1) form one rotating pair."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, head_dim/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of one layer for positions 0..max_seq_len-1, written in place while decoding."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos, k, v):
        """Store k, v (B, n_kv_heads, T, head_dim) at start_pos.. and return everything up to their end; with
        start_pos a tensor (compiled decoding: one graph for every position), the whole cache, whose entries past
        the last query its mask hides."""
        if isinstance(start_pos, torch.Tensor):
            columns = start_pos + torch.arange(k.size(2), device=k.device)
            self.k.index_copy_(2, columns, k)
            self.v.index_copy_(2, columns, v)
            return self.k, self.v
        end = start_pos + k.size(2)
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        # entries past `end` are stale (a rolled-back draft, say) and never read
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
        # query i sits at position start_pos + i and sees the keys up to there: causal from position 0, a
        # shifted triangle for a chunk on top of the cache, everything for a single new token (unless a batch of
        # padded rows brings its own mask)
        causal = mask is None and start_pos == 0 and T > 1
        if mask is None and start_pos > 0 and T > 1:
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(start_pos)
        gqa = self.n_kv_heads != self.n_heads  # each group of n_heads / n_kv_heads queries shares a key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

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


class Head(nn.Module):
    """A norm and output head of an exit's own: only the SFT+ICT baseline has these."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, h):
        return self.output(self.norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)  # shared by every exit
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # shared by every exit
        self.exit_heads = nn.ModuleDict()  # empty but for SFT+ICT: str(depth) -> Head
        self.init_rope()

    def init_rope(self, device=None):
        """(Re)compute the rotary tables; needed after building on the meta device, as they are not saved."""
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, start_pos: int = 0, n_layers: int | None = None, exits: list[int] | None = None):
        """Logits (B, T, vocab) of the depth-n_layers model (default: all layers).

        With exits=[e1, ..., ek] (increasing), returns instead the list of hidden states (B, T, dim) after
        blocks e1..ek, from one pass that stops at ek; apply head() to each for that depth's logits.
        """
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if exits is None:
            depth = n_layers or self.args.n_layers
            return self.head(self.run_layers(h, start_pos, 0, depth), depth)
        hidden, depth = [], 0
        for e in exits:
            h = self.run_layers(h, start_pos, depth, e)
            hidden.append(h)
            depth = e
        return hidden

    def run_layers(self, h, start_pos: int, first: int, last: int, pad=None):
        """Blocks first+1..last (1-based) on hidden states h (B, T, dim) at columns start_pos.. of the sequence
        (and of the KV cache). pad (B,), for a batch of left-padded prompts: row b's first pad[b] columns are
        padding, its tokens sit at positions column - pad[b], and no row attends to its padding."""
        assert 0 <= first <= last <= self.args.n_layers, (first, last)
        T = h.size(1)
        assert start_pos + T <= self.args.max_seq_len, "sequence longer than max_seq_len"
        mask = None
        if pad is None:
            cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        else:
            columns = torch.arange(start_pos, start_pos + T, device=h.device)  # of the queries
            positions = (columns - pad[:, None]).clamp(min=0)  # (B, T); padding columns get position 0, unused
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, head_dim/2)
            keys = torch.arange(start_pos + T, device=h.device)[None, None]  # every column up to the last query
            mask = (keys >= pad[:, None, None]) & (keys <= columns[None, :, None])  # (B, T, S)
            mask = mask | (keys == columns[None, :, None])  # a padding column sees itself: no softmax over nothing
            mask = mask[:, None]  # (B, 1, T, S), broadcast over heads
        for layer in self.layers[first:last]:
            h = layer(h, cos, sin, start_pos, mask)
        return h

    def head(self, h, depth: int | None = None):
        """The logits of depth `depth` (default: the last) from its hidden states h: the shared final norm and
        output head, the same for every depth, unless the exit has a head of its own."""
        norm, output = self.exit_head(depth)
        return output(norm(h))

    def exit_head(self, depth: int | None = None):
        """(norm, output layer) an exit reads through: the shared ones; an exit's own (SFT+ICT, or heads trained
        per exit); with args.exit_norm False, no norm below the last layer."""
        if depth is not None and str(depth) in self.exit_heads:
            head = self.exit_heads[str(depth)]
            return head.norm, head.output
        last = depth is None or depth == self.args.n_layers
        return (self.norm if last or self.args.exit_norm else nn.Identity()), self.output

    def add_exit_heads(self, exits: list[int]):
        for e in exits:
            self.exit_heads[str(e)] = Head(self.args)

    def decode_step(self, x, pos, first: int, last: int, pad=None):
        """Blocks first+1..last on x (token ids (B, T) when first is 0, else hidden states (B, T, dim)) at columns
        pos.. of the KV cache, pos a tensor (1,). The shapes are the same wherever the tokens stand (the whole
        static cache, a mask hiding the columns past each query), so that torch.compile makes one graph for
        every position. Hidden states (B, T, dim). pad: as in run_layers."""
        cache_len, T = self.layers[0].attention.cache.k.size(2), x.size(1)
        columns = pos + torch.arange(T, device=pos.device)  # of the queries (T,)
        keys = torch.arange(cache_len, device=pos.device)
        mask = keys[None] <= columns[:, None]  # (T, S)
        if pad is None:
            positions = columns
        else:
            positions = (columns[None] - pad[:, None]).clamp(min=0)  # (B, T)
            mask = mask[None] & (keys[None, None] >= pad[:, None, None])  # (B, T, S)
            mask = mask | (keys[None, None] == columns[None, :, None])  # as in run_layers: no softmax over nothing
        mask = mask.view(-1, 1, T, cache_len)  # broadcast over heads
        h = self.tok_embeddings(x) if first == 0 else x
        for layer in self.layers[first:last]:
            h = layer(h, self.rope_cos[positions], self.rope_sin[positions], pos, mask)
        return h

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None):
        """Give every layer a KV cache for decoding (dtype and device of the weights)."""
        w, args = self.output.weight, self.args
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
    """A fresh float32 value for parameter `name`: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    residual = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
    std = 0.02 / math.sqrt(2 * n_layers) if residual else 0.02
    return torch.empty(shape).normal_(0.0, std, generator=generator)
