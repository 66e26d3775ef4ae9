"""The trainer's run in one process on one device: a plain model, autocast for a lower precision, and plain
checkpoint files (model.safetensors for inference, train_state.pt to resume). Under torchrun, scale/fsdp.py's
Sharded takes its place with the same methods; the ones that do nothing here share decisions, files and sums among
the processes there.
"""
import os

import torch

from checkpoints import CheckpointError, save_weights


class OneProcess:
    """This process's place in the run when it is the only one: rank 0 of 1, on `device`, computing in `dtype`."""
    rank, world, shard_size, master = 0, 1, 1, True

    def __init__(self, device: torch.device, dtype: torch.dtype, activation_checkpointing=False, compile=False):
        self.device, self.dtype = device, dtype
        self.blocks = dict(activation_checkpointing=activation_checkpointing, compile=compile)
        # the weights stay float32; autocast computes in a lower dtype if one is asked for
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    @staticmethod
    @torch.no_grad()
    def put(p, t):
        p.copy_(t if isinstance(t, torch.Tensor) else t.rows())  # a checkpoint's tensor read whole (scale/: a shard)

    def build(self, make_model):
        with torch.device(self.device):
            model = make_model()
        if any(self.blocks.values()):  # activation checkpointing, compile: per block (scale/)
            from scale.fsdp import wrap_blocks
            wrap_blocks(model, **self.blocks)
        return model

    def fused_loss(self, model, fused: bool):  # soft.py's loss in chunks, if asked for (scale/fused_ce.py)
        if fused:
            from scale.fused_ce import SortedObjective
            return SortedObjective(model)
        return None

    def decide(self, fn):
        return fn()  # under torchrun: rank 0's answer, or its error, on every process

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t  # under torchrun: summed over the processes

    barrier = close = share = micro_batch = lambda self, *_, **__: None  # under torchrun: waits, checks, HSDP's sync

    def save(self, folder: str, model, opt):  # the weights for inference (in the compute dtype), the training state
        state = model.state_dict()
        # to the host one tensor at a time, cast there: a GPU near its limit has no room for a cast copy of all
        save_weights({n: t.to("cpu").to(self.dtype) for n, t in state.items()}, folder)
        torch.save({"model": state, "optim": opt.state_dict()}, os.path.join(folder, "train_state.pt"))

    def restore(self, folder: str, model, opt):
        if not os.path.exists(os.path.join(folder, "train_state.pt")):
            raise CheckpointError(f"{folder} was written under torchrun: it resumes under torchrun (--nproc_per_node 1 "
                                  f"for one device), or start anew from its weights with --init {folder}")
        state = torch.load(os.path.join(folder, "train_state.pt"), map_location=self.device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
