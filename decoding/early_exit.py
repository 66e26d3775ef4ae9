"""Confidence-based early exit: each token leaves at the first exit whose top probability reaches its threshold
(the paper's instance-aware inference: 0.95, 0.95, 0.9, 0.9, 0.8, 0.8, 0.7 at 13B's layers 12..36)."""
import torch


def exit_early(model, prompt, exits, thresholds: dict, pick, emit, size, stats):
    """Decode from prompt (1, T), each token leaving at the first exit e whose top probability reaches
    thresholds[e], with exact KV entries for the layers a token skipped.

    A token that leaves at exit e has no keys and values in layers above e. They are computed, from the hidden
    state it really had at e, the first time a later token goes deeper than e, batched with that token.
    depth[p] (how many layers position p has been through) never increases along the sequence, so the
    positions to catch up always form one run just before the current token.
    """
    L = model.args.n_layers
    T = prompt.size(1)
    if T > 1:
        model.run_layers(model.tok_embeddings(prompt[:, :-1]), 0, 0, L)  # the prompt but its last token, all layers
    depth = [L] * (T - 1) + [0] * (size - T + 1)
    saved = torch.empty(1, size, model.args.dim, dtype=model.output.weight.dtype, device=prompt.device)
    token, pos, depths = prompt[0, -1:], T - 1, []  # the last prompt token exits early like any other
    while True:
        h, prev = model.tok_embeddings(token.view(1, 1)), 0
        for e in exits:
            m = pos
            while m > 0 and depth[m - 1] < e:  # earlier positions that stopped at `prev` and lack layers prev+1..e
                m -= 1
            x = model.run_layers(torch.cat([saved[:, m:pos], h], dim=1), m, prev, e)
            saved[:, m:pos], depth[m:pos] = x[:, :-1], [e] * (pos - m)
            h = x[:, -1:]
            logits = model.head(h[:, -1], e)
            if e == L or torch.softmax(logits.float(), -1).max() >= thresholds[e]:
                break
            prev = e
        saved[:, pos], depth[pos] = h[:, 0], e
        depths.append(e)
        if stats is not None:
            stats.update(mean_exit_depth=sum(depths) / len(depths), exit_depths=list(depths))
        token = pick(logits)
        pos += 1
        if emit(token.item()) or pos >= size:
            return
