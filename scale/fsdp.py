"""Training over many processes under torchrun: FSDP2, with activation checkpointing and compile of the blocks.

The order is torchtitan's (github.com/pytorch/torchtitan): build the model on the meta device, make each block
recompute its activations in backward and compile it, fully_shard each block and then the root, give the shards
memory, keep float32 master weights and compute in bfloat16 (MixedPrecisionPolicy). `Sharded` is what
one_process.py's `OneProcess` is for one process: the same methods, for one process among many.
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

from flags import FlagError
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


def rows_of(p) -> tuple[int, int]:
    """The rows of parameter p's first dimension that this process keeps: FSDP2 cuts dim 0 as torch.chunk does,
    along the mesh dimension that shards (HSDP's other one replicates)."""
    n = p.shape[0]
    if not isinstance(p, DTensor):
        return 0, n
    (mesh_dim,) = [i for i, placement in enumerate(p.placements) if placement.is_shard()]
    assert p.placements[mesh_dim].dim == 0, p.placements
    size = -(-n // p.device_mesh.size(mesh_dim))
    start = min(p.device_mesh.get_local_rank(mesh_dim) * size, n)
    return start, min(start + size, n)


@torch.no_grad()
def put(p, t):
    """Write a tensor, or a checkpoint's Rows, into parameter p: this process reads only the rows of its shard,
    on the CPU, and moves only those to its device."""
    start, end = rows_of(p)
    part = t[start:end] if isinstance(t, torch.Tensor) else t.rows(start, end)
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
    """This process's place in a torchrun run: its rank among `world` processes, its device, the FSDP mesh.

    shard_size: hybrid sharding (HSDP), the model sharded over groups of that many processes (a node's GPUs, whose
    links are fast) and replicated across the groups (nodes). timeout: minutes a collective may wait before the run
    ends, short so that a hang shows soon; waits for file I/O (checkpoints, the tokenizer) go through a side group
    of gloo with an hour of its own. fake_world: rank 0 of a simulated run of that many processes (the memory plan):
    a fake process group whose collectives do nothing.
    """

    def __init__(self, cuda: bool, dtype: torch.dtype, activation_checkpointing=False, compile=False,
                 fake_world: int | None = None, shard_size: int | None = None, timeout: float = 10):
        self.dtype, self.flags = dtype, dict(activation_checkpointing=activation_checkpointing, compile=compile)
        self.autocast = contextlib.nullcontext()  # FSDP casts the parameters itself (MixedPrecisionPolicy)
        # start() has set this process's GPU: LOCAL_RANK's, or the only one it sees (SLURM --gpus-per-task=1)
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if fake_world:
            from torch.distributed._tools import fake_collectives  # noqa: F401 (fake tensors through collectives)
            from torch.testing._internal.distributed.fake_pg import FakeStore
            dist.init_process_group("fake", rank=0, world_size=fake_world, store=FakeStore())
        else:
            if cuda:
                torch.cuda.set_device(self.device)
            # device_id: NCCL binds to this GPU at once, rather than guessing it from the rank
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout),
                                    device_id=self.device if cuda else None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.master = self.rank == 0
        self.io = None if fake_world else dist.new_group(backend="gloo", timeout=timedelta(hours=1))
        # the mesh is built before any FakeTensorMode: building it reads real tensors
        shard_size = self.shard_size = shard_size or self.world
        if self.world % shard_size:
            raise FlagError(f"--hsdp {shard_size}: a shard group's size must divide the {self.world} processes")
        self.mesh = init_device_mesh(self.device.type, (self.world,)) if shard_size == self.world else \
            init_device_mesh(self.device.type, (self.world // shard_size, shard_size), mesh_dim_names=("replicate",
                                                                                                      "shard"))
        self.root = None

    def say(self, text: str):
        if self.master:
            print(text)

    def barrier(self):
        dist.barrier(group=self.io)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """A small CPU tensor summed over the processes (NCCL reduces only tensors on the GPU)."""
        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def decide(self, fn):
        """fn() run by rank 0 alone, and its value, or the error it raised, on every process: what decides the run
        (the checkpoint to resume, the tokenizer, a folder's name) is decided once, whatever each node's view of
        a shared filesystem."""
        box = [None]
        if self.master:
            try:
                box = [(fn(), None)]
            except Exception as e:  # a user's mistake, a folder that cannot be made: every process stops with it
                box = [(None, e)]
        dist.broadcast_object_list(box, src=0, group=self.io)
        value, error = box[0]
        if error is not None:
            error.decided = True  # rank 0 prints it, once
            raise error
        return value

    def share(self, folder: str):
        """Prove that every process sees the files rank 0 writes into folder, or stop the run saying which do not."""
        marker = os.path.join(folder, f".shared-{self.decide(lambda: os.urandom(6).hex())}")
        if self.master:
            open(marker, "w").close()
        self.barrier()
        seen = [None] * self.world
        dist.all_gather_object(seen, os.path.exists(marker), group=self.io)
        if self.master:
            os.remove(marker)
        blind = [rank for rank, saw in enumerate(seen) if not saw]
        if blind:
            error = FlagError(f"--out {folder}: the processes of rank {blind} do not see the file rank 0 wrote there: "
                              "it must be one folder on a filesystem every node shares")
            error.decided = True
            raise error

    def build(self, make_model):
        """The model on the meta device, each block wrapped, sharded in groups, then given float32 memory for this
        process's shards. A group is gathered whole for its forward and again for its backward, and freed between
        and after: each block; the embeddings (for the first forward only: their gradient needs no weights); each
        exit's own norm and head,
        if it has one (seven at 13B would otherwise stay whole on every GPU through the step, 2.3 GB). The root, the
        objective, holds the rest, the shared final norm and output head, which every exit reads from the first
        one's loss on and the backward needs at once: gathered once a step."""
        with torch.device("meta"):
            model = make_model()
        self.root = SortedObjective(model)
        wrap_blocks(model, **self.flags)
        mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for module in [*model.layers, model.tok_embeddings, *getattr(model, "exit_heads", {}).values()]:
            fully_shard(module, mesh=self.mesh, mp_policy=mp)
        if hasattr(model.tok_embeddings, "set_unshard_in_backward"):  # torch >= 2.8
            # an embedding's gradient needs the token ids, never the table: no all-gather of it in backward
            model.tok_embeddings.set_unshard_in_backward(False)
        fully_shard(self.root, mesh=self.mesh, mp_policy=mp)
        self.root.to_empty(device=self.device)
        model.init_rope(self.device)
        return model

    put = staticmethod(put)

    def micro_batch(self, last: bool):
        """Before each micro-batch's backward: under HSDP its gradients cross the replicas (the nodes) only with the
        step's last micro-batch; within a shard group they are reduce-scattered at every one, so that no process
        holds more than its shard of them."""
        if self.mesh.ndim == 2:
            self.root.set_requires_all_reduce(last)

    def fused_loss(self, model, fused: bool = True):
        return self.root  # the root of the sharding, and so always the fused loss

    def save(self, folder: str, model, opt):
        """Into folder: the training state (every process its own shard, DCP) and the weights for inference in the
        compute dtype (model.safetensors)."""
        reshard(self.root)
        ckpt.save_train_state(folder, self.root, opt, self.io)
        ckpt.save_full_weights(folder, model, self.master, self.dtype)

    def restore(self, folder: str, model, opt):
        self.decide(lambda: ckpt.check_train_state(folder))
        ckpt.restore_train_state(folder, self.root, opt, self.io)

    def close(self):
        """End the process group once every process is done with it: one that left while another still had a
        collective under way could abort the other at exit."""
        self.barrier()
        dist.destroy_process_group()
