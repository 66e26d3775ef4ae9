"""Training over many processes under torchrun: FSDP2, with activation checkpointing and compile of the blocks.

The order is torchtitan's (github.com/pytorch/torchtitan): build the model on the meta device, make each block
recompute its activations in backward and compile it, fully_shard each block and then the root, give the shards
memory, keep float32 master weights and compute in bfloat16 (MixedPrecisionPolicy). `Sharded` is what
sorted_train.py's `OneProcess` is for one process: the same methods, for one process among many.
"""
import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from scale import checkpoint as ckpt
from scale.fused_ce import SortedObjective


def recomputed(forward):
    """forward, run under activation checkpointing: its activations are recomputed in backward, not kept.

    A plain function rather than functools.partial(checkpoint, forward): torch.compile traces through this one
    and compiles the checkpointed block, while it leaves a partial of checkpoint uncompiled.
    """
    def run(*args):
        return checkpoint(forward, *args, use_reentrant=False)
    return run


def wrap_blocks(model, activation_checkpointing: bool = False, compile: bool = False):
    """Per block: recompute its activations in backward, then compile it (the checkpointed block inside)."""
    for block in model.layers:
        if activation_checkpointing:
            block.forward = recomputed(block.forward)
        if compile:
            block.compile()


def local(t):
    """This process's part of a (possibly sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_of(full: torch.Tensor, p) -> torch.Tensor:
    """The part of a whole tensor that this process keeps of parameter p (FSDP2 cuts dim 0 as torch.chunk does)."""
    if not isinstance(p, DTensor):
        return full
    (placement,) = p.placements
    mesh = p.device_mesh
    chunks = full.chunk(mesh.size(), dim=placement.dim)
    rank = mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else full.narrow(placement.dim, 0, 0)


@torch.no_grad()
def put(p, full: torch.Tensor):
    """Write a whole tensor into parameter p: this process cuts its shard on the CPU and moves only that."""
    part = shard_of(full, p)
    assert part.shape == local(p).shape, (part.shape, local(p).shape)
    local(p).copy_(part)


def reshard(root):
    """Free the gathered parameters a no-grad forward leaves behind.

    FSDP2 reshards the root after forward only when a backward follows: after evaluation it keeps the whole of
    the embeddings and the shared head gathered (bfloat16 copies, 650 MB at 13B), and the module's parameters are
    then those full tensors rather than this process's shards, which is what saving a checkpoint next reads.
    """
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class Sharded:
    """This process's place in a torchrun run of `world` processes: its rank, its device, the FSDP mesh.

    fake_world: rank 0 of a simulated run (the memory plan): a fake process group whose collectives do nothing.
    """

    def __init__(self, cuda: bool, dtype: torch.dtype, activation_checkpointing=False, compile=False,
                 fake_world: int | None = None):
        self.dtype, self.flags = dtype, dict(activation_checkpointing=activation_checkpointing, compile=compile)
        self.autocast = contextlib.nullcontext()  # FSDP casts the parameters itself (MixedPrecisionPolicy)
        if fake_world:
            from torch.distributed._tools import fake_collectives  # noqa: F401 (fake tensors through collectives)
            from torch.testing._internal.distributed.fake_pg import FakeStore
            dist.init_process_group("fake", rank=0, world_size=fake_world, store=FakeStore())
            self.device = torch.device("cpu")
        else:
            if cuda:  # TF32 for float32 matmuls: the float32 parts of training lose nothing that matters
                torch.backends.cuda.matmul.allow_tf32 = True
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
            if cuda:
                torch.cuda.set_device(self.device)  # before NCCL starts, so that each rank talks from its own GPU
            # the other ranks wait while rank 0 writes the weights for inference (26 GB in bfloat16 at 13B): allow
            # more than NCCL's default 10 minutes for a slow shared filesystem
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.master = self.rank == 0
        # the mesh is built before any FakeTensorMode: building it reads real tensors
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        self.root = None

    def say(self, text: str):
        if self.master:
            print(text)

    def barrier(self):
        dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """A small CPU tensor summed over the processes (NCCL reduces only tensors on the GPU)."""
        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def decide(self, value):
        """Rank 0's value, on every process."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def build(self, make_model):
        """The model on the meta device, each block wrapped, sharded (each block, then the root: the objective,
        which holds the embeddings and the heads), then given float32 memory for this process's shards."""
        with torch.device("meta"):
            model = make_model()
        self.root = SortedObjective(model)
        wrap_blocks(model, **self.flags)
        mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.layers:
            fully_shard(block, mesh=self.mesh, mp_policy=mp)
        fully_shard(self.root, mesh=self.mesh, mp_policy=mp)
        self.root.to_empty(device=self.device)
        model.init_rope(self.device)
        return model

    put = staticmethod(put)

    def objective(self, model, fused: bool = True):
        return self.root  # the root of the sharding, and so always the fused loss

    def save(self, folder: str, model, opt):
        """Into folder: the training state (every process its own shard, DCP) and the weights for inference in the
        compute dtype (model.safetensors)."""
        reshard(self.root)
        ckpt.save_train_state(folder, self.root, opt)
        ckpt.save_full_weights(folder, model, self.master, self.dtype)

    def restore(self, folder: str, model, opt):
        ckpt.restore_train_state(folder, self.root, opt)

    def close(self):
        """End the process group once every process is done with it: one that left while another still had a
        collective under way could abort the other at exit."""
        dist.barrier()
        dist.destroy_process_group()
