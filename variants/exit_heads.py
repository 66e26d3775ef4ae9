"""Exits that do not read through the shared final norm and head (arXiv 2309.08968: the SFT+ICT baseline and two
of the paper's open questions).

- SFT+ICT (sorted_train.py --mode ict): the paper's early-exit baseline; an SFT model frozen, and a norm and
  output head of each exit's own trained on that exit (Head below).
- --separate_heads: each exit below the last gets a head of its own, trained jointly with the trunk by the summed
  loss; the shared head then takes only the last layer's loss.
- --no_exit_norm: the exits below the last read the shared output head without the final RMSNorm.

The heads are parameters `exit_heads.{depth}.norm.weight` and `exit_heads.{depth}.output.weight` of the checkpoint;
params.json records `exit_heads` and `exit_norm`, from which load_llama.load_model builds this model again.
"""
import torch
import torch.nn as nn

from model import ModelArgs, RMSNorm, Transformer


class Head(nn.Module):
    """A norm and an output head of one exit's own."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, h):
        return self.output(self.norm(h))


class ExitHeadsTransformer(Transformer):
    """LLaMA 2 whose exits in `heads` read through heads of their own, and whose exits below the last read the
    shared head without the final norm unless exit_norm. frozen_trunk (SFT+ICT): only the exits' heads train."""

    def __init__(self, args: ModelArgs, heads=(), exit_norm: bool = True, frozen_trunk: bool = False):
        super().__init__(args)
        self.exit_heads = nn.ModuleDict({str(e): Head(args) for e in heads})
        self.exit_norm = exit_norm
        if frozen_trunk:
            self.requires_grad_(False)
            self.exit_heads.requires_grad_(True)

    def exit_head(self, depth: int | None = None):
        if depth is not None and str(depth) in self.exit_heads:
            head = self.exit_heads[str(depth)]
            return head.norm, head.output
        last = depth is None or depth == self.args.n_layers
        return (self.norm if last or self.exit_norm else nn.Identity()), self.output

    @torch.no_grad()
    def heads_from_shared(self, absent: list[str]):
        """Start each exit's own head that the loaded weights lacked (absent: parameter names) as a copy of the shared
        norm and head (an SFT checkpoint has no SFT+ICT heads yet; a fresh model draws none)."""
        for e, head in self.exit_heads.items():
            if f"exit_heads.{e}.output.weight" in absent:
                head.norm.weight.copy_(self.norm.weight)
                head.output.weight.copy_(self.output.weight)
