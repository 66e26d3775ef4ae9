"""One decoding step of the fast decoders: layers first+1..last on a chunk of tokens, eager or compiled.

Eager, a batch of left-padded prompts needs positions and a mask of its own per row (padding_masks). Compiled, the
step runs over a static KV cache whose position is a tensor, so that one graph serves every position
(gpt-fast's design): the cache is written with index_copy_ and read whole, a mask hiding the columns past each
query. On CUDA the graphs are replayed as CUDA graphs. The same static step, given one column per row, lets the rows
of a batch stand at columns of their own (batched self-speculation: each row accepts its own number of drafts).
"""
import torch

from model import KVCache, Transformer


def padding_masks(pad, start_pos: int, T: int, device):
    """(positions (B, T), attention mask (B, 1, T, S)) for T queries at columns start_pos.. of left-padded rows:
    row b's first pad[b] columns are padding, its tokens sit at positions column - pad[b], and no row attends to its
    padding."""
    columns = torch.arange(start_pos, start_pos + T, device=device)  # of the queries
    positions = (columns - pad[:, None]).clamp(min=0)  # padding columns get position 0, unused
    keys = torch.arange(start_pos + T, device=device)[None, None]  # every column up to the last query
    mask = (keys >= pad[:, None, None]) & (keys <= columns[None, :, None])  # (B, T, S)
    mask = mask | (keys == columns[None, :, None])  # a padding column sees itself: no softmax over nothing
    return positions, mask[:, None]  # broadcast over heads


class StaticKVCache(KVCache):
    """A KV cache written at a position given as a tensor, and read whole: the same shapes at every position."""

    def update(self, start_pos, k, v):
        """k, v (B, n_kv_heads, T, head_dim) at columns start_pos.. (start_pos (1,): every row there; (B,): row b
        at start_pos[b]..); the whole cache back."""
        columns = start_pos[:, None] + torch.arange(k.size(2), device=k.device)  # (1 or B, T)
        if columns.size(0) == 1:
            self.k.index_copy_(2, columns[0], k)
            self.v.index_copy_(2, columns[0], v)
        else:  # each row at its own columns: row b's T entries go to columns[b]
            rows = torch.arange(k.size(0), device=k.device)[:, None]
            self.k[rows, :, columns] = k.transpose(1, 2)  # the indexed view is (B, T, n_kv_heads, head_dim)
            self.v[rows, :, columns] = v.transpose(1, 2)
        return self.k, self.v  # the entries past the last query are hidden by decode_step's mask


def decode_step(model: Transformer, x, pos, first: int, last: int, pad=None):
    """Blocks first+1..last on x (token ids (B, T) when first is 0, else hidden states (B, T, dim)) at columns
    pos.. of the static cache, pos a tensor: (1,) for every row at one column, (B,) for each row at its own; hidden
    states (B, T, dim). pad: as in padding_masks."""
    cache_len, T = model.layers[0].attention.cache.k.size(2), x.size(1)
    columns = pos[:, None] + torch.arange(T, device=pos.device)  # of the queries (1 or B, T)
    keys = torch.arange(cache_len, device=pos.device)
    mask = keys <= columns[..., None]  # (1 or B, T, S)
    if pad is None:
        positions = columns
    else:
        positions = (columns - pad[:, None]).clamp(min=0)  # (B, T)
        mask = mask & (keys >= pad[:, None, None])
        mask = mask | (keys == columns[..., None])  # as in padding_masks: no softmax over nothing
    h = model.tok_embeddings(x) if first == 0 else x
    return model.run_layers(h, pos, first, last, positions, mask[:, None])  # the mask broadcast over heads


def layers_fn(model: Transformer, compile: bool = False):
    """f(x, pos, first, last, pad=None, every=False) -> (hidden states (B, T, dim), logits (B, T or 1, V)): blocks
    first+1..last on x (token ids (B, T) if first is 0, else hidden states) at columns pos.. of the KV cache,
    then the head of depth `last` on every position (every) or on the last one. pos: an int (every row at that
    column of a plain KVCache, eager only), or a tensor (1,) or (B,) (the static cache of open_cache(..., static)).

    Compiled: decode_step, a graph for each range of layers and each chunk length, with chunks of several tokens
    (prompts, verified drafts) right-padded to a power of two (their padding's cache entries lie past every query
    that could read them, and are overwritten before any does), so that a few graphs serve every length. On CUDA
    the graphs are replayed as CUDA graphs ("reduce-overhead"). The model keeps its compiled function: compiling
    costs once per process.
    """
    def step(x, pos, first, last, pad, every, end):
        """end: where the last real token of x is (a tensor (1,) when compiled, so that padding costs no graph; None:
        the last position)."""
        if not isinstance(pos, int):
            h = decode_step(model, x, pos, first, last, pad)
        else:
            positions, mask = (None, None) if pad is None else padding_masks(pad, pos, x.size(1), x.device)
            h = model.run_layers(model.tok_embeddings(x) if first == 0 else x, pos, first, last, positions, mask)
        return h, model.head(h if every else h[:, -1:] if end is None else h.index_select(1, end), last)
    if not compile:
        return lambda x, pos, first, last, pad=None, every=False: step(x, pos, first, last, pad, every, None)
    if getattr(model, "compiled_step", None) is None:
        # a graph per range of layers, chunk size and batch size: more than dynamo's default of 8 for one
        # function; the setting's name differs across torch versions
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        cuda = model.output.weight.is_cuda
        model.compiled_step = torch.compile(step, fullgraph=True, dynamic=False,
                                            mode="reduce-overhead" if cuda else None)
    device = model.output.weight.device
    ends = {}  # end's tensor for each chunk length, made once

    def compiled(x, pos, first, last, pad=None, every=False):
        T = x.size(1)
        if isinstance(pos, int):
            pos = torch.tensor([pos], device=device)
        if T > 1:  # the next power of two, if the cache has room for it (one host sync, once a chunk)
            size = min(1 << (T - 1).bit_length(), model.layers[0].attention.cache.k.size(2) - int(pos.max()))
            if size > T:
                x = torch.cat([x, x[:, -1:].expand(-1, size - T, *x.shape[2:])], dim=1)
        if T not in ends:
            ends[T] = torch.tensor([T - 1], device=device)
        h, logits = model.compiled_step(x, pos, first, last, pad, every, ends[T])
        if device.type == "cuda":  # a CUDA graph's next replay overwrites its outputs; drafts keep theirs a while
            h, logits = h.clone(), logits.clone()
        return h[:, :T], logits[:, :T]
    return compiled


def open_cache(model: Transformer, batch_size: int, size: int, static: bool):
    """Give the layers a KV cache for one decode: of `size` columns, or, static (compiled decoding, and rows at
    columns of their own), a StaticKVCache of the next power of two (at most max_seq_len), the same one from one call
    to the next while its shape stays (the graphs are specialised to it, and CUDA graphs to its memory);
    model.drop_cache() takes it off again, so that no other forward writes to it. A compiled step attends over its
    whole cache: sized to the decode rather than to max_seq_len, a short decode does not pay for the columns it never
    reaches, and a few sizes serve every decode."""
    if not static:
        return model.setup_cache(batch_size, size)
    columns = min(1 << (size - 1).bit_length(), model.args.max_seq_len)
    kept = getattr(model, "static_cache", None)
    if kept is None or kept[0].k.shape[::2] != (batch_size, columns):
        w, args = model.output.weight, model.args
        model.static_cache = [StaticKVCache(batch_size, columns, args.n_kv_heads, args.head_dim, w.dtype, w.device)
                              for _ in model.layers]
    for layer, cache in zip(model.layers, model.static_cache):
        layer.attention.cache = cache
