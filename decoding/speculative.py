"""Self-speculative decoding, for one prompt or a batch: the first K layers of the same model draft, the full model
verifies.

A sorted model's shallow exits agree with its last layer most of the time, so the first K layers and the shared
head draft a few tokens one by one, and layers K+1..L check all of them in one pass. No second model and no
extra memory: the verifier starts from the hidden states the draft left after layer K, and the draft's KV
entries for layers 1..K are the model's own. Greedy output is exactly the full model's; with sampling, speculative
rejection sampling (Leviathan et al. 2023) keeps the full model's distribution.

A batch shares one static KV cache in which each row stands at a column of its own (step.decode_step with one
column per row): a row accepts its own number of drafts and moves on by that many, its keys and values written at
its own columns and its queries masked to them, so no row waits for another's acceptance and nothing is copied.
"""
import torch

from sampling import logits_to_probs, sample


@torch.no_grad()
def speculate(model, prompts, pad, layers, *, K: int, N: int, confidence: float, max_new: int, eos_id,
              sampling: tuple, on_token=None, stats: dict | None = None) -> list[list[int]]:
    """The new tokens of each row of prompts (B, T) (left-padded by pad (B,), or None), up to max_new a row, each
    row stopping at its own EOS (not included); layers is step.layers_fn's function over a static cache of at least
    T + max_new columns, sampling (temperature, top_k, top_p, generator), on_token(row, id) sees tokens as they come.

    A cycle: layers 1..K draft n tokens one by one (greedy drafts are an argmax: no softmax), layers K+1..L verify
    the last token and all n drafts in one pass from the hidden states the draft left, and each row keeps its
    drafts up to its first disagreement, then the full model's own next token. Rejected positions need no undo:
    their cache entries lie past the row's column, are never read, and are overwritten by its next draft.

    n adapts to the acceptance (HF's heuristic: two more after a cycle in which some row kept every draft, one fewer
    otherwise, within 1..N), and shrinks near max_new so that no layer runs a position the output cannot reach.
    With confidence > 0 a draft also stops once no row is sure of its next token (top probability below
    confidence) or every row has drafted an EOS: that costs a host sync per draft; at 0 the drafts run without one
    (a draft past an EOS is wasted work, never output). Where a draft stops depends only on the draft, so the
    output is unchanged.
    """
    B, T = prompts.shape
    if max_new < 1:
        return [[] for _ in range(B)]
    L, device = model.args.n_layers, prompts.device
    rows = torch.arange(B, device=device)
    temperature, top_k, top_p, generator = sampling
    logits = layers(prompts, torch.zeros(1, dtype=torch.long, device=device), 0, L, pad)[1][:, -1]  # (B, V)
    token = sample(logits, temperature, top_k, top_p, generator)  # (B,) each row's next token, unseen by any layer
    pos = torch.full((B,), T, device=device)  # the column where each row's `token` goes
    out, live, new = [[] for _ in range(B)], [True] * B, [[t] for t in token.tolist()]
    n, drafted, accepted, cycles, by_row = N, 0, 0, 0, [0] * B
    no_eos = -1 if eos_id is None else eos_id
    while True:
        for b in range(B):  # record each row's new tokens, until its EOS or its max_new-th token
            for t in new[b] if live[b] else []:
                live[b] = t != eos_id and len(out[b]) + 1 < max_new
                if t != eos_id:
                    out[b].append(t)
                    if on_token:
                        on_token(b, t)
                if not live[b]:
                    break
        if not any(live):
            return out
        live_rows = torch.tensor(live, device=device)
        pos = torch.where(live_rows, pos, 0)  # a row that has stopped idles at column 0, inside the cache
        # a cycle adds at most n + 1 tokens to a row: none past max_new, so no layer runs a position never output
        n = min(n, max_new - 1 - max(len(o) for o, alive in zip(out, live) if alive))

        # --- draft: layers 1..K, one token at a time
        x, hidden, drafts, q, sure = token[:, None], [], [], [], live_rows
        for i in range(n + 1):
            h, logits = layers(x, pos + i, 0, K, pad)  # (B, 1, dim), (B, 1, V)
            hidden.append(h)  # the verifier continues from here: for the last token, then for each draft
            if i == n:
                break
            if temperature == 0.0:
                x = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            else:
                probs = logits_to_probs(logits[:, -1], temperature, top_k, top_p)
                x = torch.multinomial(probs, 1, generator=generator)
            if confidence > 0:
                top = (probs if temperature else torch.softmax(logits[:, -1].float(), -1)).amax(-1)
                sure = sure & (top >= confidence)
                goes_on = sure & (x[:, 0] != no_eos)  # nothing follows an EOS: its hidden state is never needed
                any_sure, any_goes_on = torch.stack([sure.any(), goes_on.any()]).tolist()  # one host sync
                if not any_sure:  # every row is unsure: let the full model take the next token itself
                    break
                sure = goes_on
            drafts.append(x)
            if temperature:
                q.append(probs)
            if confidence > 0 and not any_goes_on:
                break

        # --- verify: layers K+1..L on the last token and the drafts at once
        m, c = len(drafts), len(hidden)  # c is m + 1, or m after a draft that ended on an EOS
        d = torch.cat(drafts, 1) if drafts else token.new_zeros(B, 0)  # (B, m)
        logits = layers(torch.cat(hidden, 1), pos, K, L, pad, every=True)[1]  # (B, c, V)
        if temperature == 0.0:
            target = logits.argmax(-1)  # (B, c)
            k = (d == target[:, :m]).int().cumprod(1).sum(1)  # (B,) drafts kept: up to the first disagreement
            nxt = target[rows, k.clamp(max=c - 1)]  # the full model's correction, or its bonus token
        else:  # keep draft d with probability min(1, p(d) / q(d)); at the first rejection, sample max(0, p - q)
            p = logits_to_probs(logits, temperature, top_k, top_p)  # (B, c, V)
            q = torch.stack([*q, torch.zeros_like(p[:, 0])], 1)  # (B, m + 1, V): past the drafts, q = 0
            p_d, q_d = p[:, :m].gather(2, d[..., None])[..., 0], q[:, :m].gather(2, d[..., None])[..., 0]  # (B, m)
            u = torch.rand(B, m, generator=generator, device=device)
            k = (u * q_d < p_d).int().cumprod(1).sum(1)
            at = k.clamp(max=c - 1)  # the first rejected draft's position, or the one past the drafts
            p_k, q_k = p[rows, at], q[rows, at]  # (B, V)
            residual = (p_k - q_k).clamp(min=0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_k)
            nxt = torch.multinomial(residual, 1, generator=generator)[:, 0]
        # the cycle's tokens: each row's kept drafts, then the full model's token (none after a kept final EOS)
        ks, d_rows, nxt_rows = k.tolist(), d.tolist(), nxt.tolist()
        new = [d_rows[b][:ks[b]] + ([nxt_rows[b]] if ks[b] < c else []) for b in range(B)]
        token = torch.tensor([r[-1] for r in new], device=device)
        pos = pos + torch.tensor([len(r) for r in new], device=device)
        kept = [ks[b] for b in range(B) if live[b]]
        drafted, accepted, cycles = drafted + m * len(kept), accepted + sum(kept), cycles + 1
        by_row = [a + (ks[b] if live[b] else 0) for b, a in enumerate(by_row)]
        if stats is not None:
            stats.update(drafted=drafted, accepted=accepted, acceptance=accepted / max(drafted, 1), cycles=cycles,
                         accepted_by_row=by_row)
        n = min(N, n + 2) if max(kept) == m else max(1, n - 1)
