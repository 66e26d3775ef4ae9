"""The SoFT objective (arXiv 2309.08968, Eq. 1): one forward pass keeps the hidden state h_e after each exit e,
each goes through the same final RMSNorm and the same output head, and the exits' cross-entropies on the response
tokens y are summed:   loss = sum_e w_e * CE(output(norm(h_e)), y)
(the paper averages them: w_e = 1/|exits|). SFT is the same with the last layer as the only exit. This plain version
holds one exit's whole logits at a time; scale/fused_ce.py computes the same loss and gradients without them.
"""
import torch
import torch.nn.functional as F


def sorted_loss(model, tokens, positions, targets, exits: list[int], weights: list[float], scale: float = 1.0):
    """(scale * sum_e weights[e] * CE_e, the per-exit sums of token cross-entropies CE_e (E,), detached).

    tokens (B, T); positions (N,) are the response tokens' indices in the flattened (B*T) batch and targets (N,)
    the tokens they predict: no prompt position reaches the head.
    """
    hidden = model(tokens, exits=exits)  # E x (B, T, dim), from one pass
    ce = torch.stack([F.cross_entropy(model.head(h.flatten(0, 1)[positions], e).float(), targets, reduction="sum")
                      for e, h in zip(exits, hidden)])  # (E,)
    loss = scale * (torch.tensor(weights, device=ce.device) * ce).sum()
    return loss, ce.detach()
