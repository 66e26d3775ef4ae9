"""Sampling: pure functions from a model's logits to its next token (greedy, temperature, top-k, top-p)."""
import torch


def logits_to_probs(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """Next-token distribution (..., vocab) after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token once the tokens more likely than it already cover top_p (the first one always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits, temperature: float = 0.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (..., vocab); temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs.view(-1, probs.size(-1)), 1, generator=generator).view(probs.shape[:-1])
