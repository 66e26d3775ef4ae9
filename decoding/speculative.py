"""Self-speculative decoding: the first K layers of the same model draft, the full model verifies.

A sorted model's shallow exits agree with its last layer most of the time, so the first K layers and the shared
head draft a few tokens one by one, and layers K+1..L check all of them in one pass. No second model and no
extra memory: the verifier starts from the hidden states the draft left after layer K, and the draft's KV
entries for layers 1..K are the model's own. Greedy output is exactly the full model's; with sampling, speculative
rejection sampling (Leviathan et al. 2023) keeps the full model's distribution.
"""
import torch

from sampling import logits_to_probs


def speculate(model, prompt, K, N, confidence, pick, emit, end, eos_id, stats, sampling, layers):
    """Decode from prompt (1, T): layers 1..K draft up to N tokens, layers K+1..L verify from their hidden states.

    Rejected positions need no undo: their cache entries lie past the accepted length, are never read, and are
    overwritten by the next draft. A draft stops early where its own top probability falls below `confidence` (a
    token it would probably get wrong costs K layers and buys nothing), at EOS, and where decoding would end anyway
    (position `end`). Where to stop depends only on the draft, so the output is unchanged. pick(logits) samples a
    token, emit(token) records one and says whether to stop; layers is decoding.step.layers_fn's function.
    """
    L = model.args.n_layers
    temperature, top_k, top_p, generator = sampling
    token = pick(layers(prompt, 0, 0, L)[1][:, -1])
    pos = prompt.size(1)  # position of `token`, which no layer has seen yet
    drafted = accepted = 0
    if emit(token.item()):
        return
    while True:
        hidden, drafts, q = [], [], []
        x = token
        limit = min(N, end - 2 - pos)  # a cycle adds its drafts and one more token, all before position `end`
        for i in range(limit + 1):
            h, draft_logits = layers(x.view(1, 1), pos + i, 0, K)  # (1, 1, dim), (1, 1, V)
            hidden.append(h)  # the verifier continues from here, for x and for every draft before it
            if i == limit:
                break
            probs = logits_to_probs(draft_logits[0, -1], temperature or 1.0, top_k, top_p)
            if probs.max() < confidence:  # the draft is unsure: let the full model take the next token itself
                break
            if temperature == 0.0:
                x = probs.argmax(-1, keepdim=True)
            else:
                q.append(probs)
                x = torch.multinomial(probs, 1, generator=generator)
            drafts.append(x.item())
            if drafts[-1] == eos_id:  # nothing follows an accepted EOS: it needs no hidden state of its own
                break
        n = len(drafts)
        logits = layers(torch.cat(hidden, dim=1), pos, K, L, every=True)[1][0]  # (n+1, V) (n after EOS) at once
        if temperature == 0.0:
            target = logits.argmax(-1).tolist()
            k = 0  # drafts accepted
            while k < n and drafts[k] == target[k]:
                k += 1
            # then the full model's correction, or its bonus token when every draft was accepted (none after EOS)
            new = drafts[:k] + target[k:k + 1]
        else:  # speculative sampling: the output follows the full model's distribution
            p = logits_to_probs(logits, temperature, top_k, top_p)
            k = 0  # accept draft d with probability min(1, p(d) / q(d)): u * q(d) < p(d) for u uniform in [0, 1)
            while k < n and torch.rand(1, generator=generator, device=p.device).item() * q[k][drafts[k]] < \
                    p[k, drafts[k]]:
                k += 1
            new = drafts[:k]
            if k < n:  # rejected: sample from what the full model wants beyond what the draft offered
                residual = (p[k] - q[k]).clamp(min=0)
                residual = residual if residual.sum() > 0 else p[k]
                new.append(torch.multinomial(residual / residual.sum(), 1, generator=generator).item())
            elif k < p.size(0):
                new.append(torch.multinomial(p[k], 1, generator=generator).item())
        drafted, accepted = drafted + n, accepted + k
        if stats is not None:
            stats.update(drafted=drafted, accepted=accepted, acceptance=accepted / max(drafted, 1))
        for t in new:
            if emit(t):
                return
        token = torch.tensor([new[-1]], device=prompt.device)
        pos += len(new)
