"""The SoFT loss of soft.py, computed without ever holding an exit's logits: a chunked, fused cross-entropy.

soft.sorted_loss builds each exit's (tokens, vocab) logits in full and lets autograd keep them for backward: at
13B's vocabulary of 32,000 that is 128 KB a token in float32, for every exit. LinearCrossEntropy instead works
through the rows a chunk at a time and computes the gradient in the forward pass: only a (chunk, vocab) slice of
logits exists at any time, and backward only scales the stored gradients. Summing eight exits then costs their
matmuls and no more memory than their hidden states. The sorted_train.py flag --fused_ce uses it in one process;
under torchrun it is always used. tests/test_train.py checks that both give the same loss and gradients.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(x_i @ W.T, y_i), with the gradient worked out chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, x, weight, labels, row_weights, chunk: int):
        ce = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, x.size(0), chunk):
            xc, yc = x[s:s + chunk], labels[s:s + chunk]
            logits = (xc @ weight.T).float()  # (chunk, vocab)
            target = logits.gather(1, yc[:, None]).squeeze(1)
            top = logits.amax(-1, keepdim=True)
            # exp(logit - max), written over the logits to save memory; clamped so that no probability is a
            # denormal float, which would slow the CPU matmuls below tenfold (e^-80 is still a normal float)
            g = logits.sub_(top).clamp_(min=-80.0).exp_()
            total = g.sum(-1, keepdim=True)
            ce[s:s + chunk] = (top + total.log()).squeeze(1) - target
            # d CE / d logits = softmax - onehot
            g.div_(total)
            g[torch.arange(len(yc), device=g.device), yc] -= 1.0
            g.mul_(row_weights[s:s + chunk, None])
            g = g.to(weight.dtype)
            grad_x[s:s + chunk] = g @ weight
            grad_w.add_(g.T @ xc)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce)
        return (ce * row_weights).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


def linear_cross_entropy(x, weight, labels, row_weights):
    """(weighted sum of the rows' cross-entropies, per-row cross-entropy) for logits x @ weight.T."""
    chunk = max(1, 2 ** 24 // weight.size(0))  # rows per chunk: ~16M logits at a time
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, labels, row_weights, chunk)
    ce = torch.cat([F.cross_entropy((x[s:s + chunk] @ weight.T).float(), labels[s:s + chunk], reduction="none")
                    for s in range(0, x.size(0), chunk)])
    return (ce * row_weights).sum(), ce


class SortedObjective(nn.Module):
    """soft.sorted_loss, fused for the shared head; a module, so that FSDP's root wraps every use of the shared norm
    and head."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, targets, exits: list[int], weights: list[float], scale: float = 1.0):
        """(loss, per-exit sums of token cross-entropies (E,)), as soft.sorted_loss."""
        hidden = [h.flatten(0, 1)[positions] for h in self.model(tokens, exits=exits)]  # E x (N, dim)
        N, loss, ce = targets.numel(), 0, [None] * len(exits)
        # the exits that read the shared output head go through it in one call, in chunks (one gradient buffer for
        # its weight, however many exits): with SoFT, every exit
        shared = [i for i, e in enumerate(exits) if self.model.exit_head(e)[1] is self.model.output]
        if shared:
            x = torch.cat([self.model.exit_head(exits[i])[0](hidden[i]) for i in shared])  # (k*N, dim), normed
            w = torch.tensor([weights[i] for i in shared], device=targets.device).repeat_interleave(N) * scale
            part, row_ce = linear_cross_entropy(x, self.model.output.weight, targets.repeat(len(shared)), w)
            loss = loss + part
            for i, c in zip(shared, row_ce.view(len(shared), N).sum(1)):
                ce[i] = c
        # an exit with a head of its own (SFT+ICT, --separate_heads) calls that head as a module, so that FSDP, which
        # shards each such head as a group of its own, gathers it for the call and frees it after
        for i, e in enumerate(exits):
            if ce[i] is None:
                ce[i] = F.cross_entropy(self.model.exit_heads[str(e)](hidden[i]).float(), targets, reduction="sum")
                loss = loss + scale * weights[i] * ce[i]
        return loss, torch.stack(ce).detach()
