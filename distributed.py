"""Training at scale for sorted_train.py: FSDP2 sharding, weights into shards, checkpoints, a memory estimate.

The order is torchtitan's (github.com/pytorch/torchtitan): build the model on the meta device, make each block
recompute its activations in backward and compile it, fully_shard each block and then the root, keep float32
master weights and compute in bfloat16 (MixedPrecisionPolicy). The training state goes through
torch.distributed.checkpoint (DCP): every rank writes its own shard, and a run saved with N processes resumes
with M. The weights for inference are one model.safetensors in the layout load_llama.load_model reads.
"""
import contextlib
import json
import os
import pickle
import resource
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from load_llama import CheckpointError, save_model


@dataclass
class Dist:
    """This process's place in the run: rank among `world` processes, device, and the FSDP mesh (None: no FSDP)."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None

    @property
    def fsdp(self) -> bool:
        return self.mesh is not None

    @property
    def master(self) -> bool:
        return self.rank == 0

    def say(self, *args, **kwargs):
        """print, on rank 0 only."""
        if self.master:
            print(*args, **kwargs)

    def barrier(self):
        if self.fsdp:
            dist.barrier()

    def close(self):
        """End the process group, once every rank is done with it: one that left while another still had a
        collective under way could abort the other at exit."""
        if self.fsdp:
            dist.barrier()
            dist.destroy_process_group()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """A small CPU tensor summed over ranks (NCCL reduces only tensors on the GPU)."""
        if not self.fsdp:
            return t
        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()


def setup(cuda: bool) -> Dist:
    """One process per GPU (or CPU process) under torchrun, with FSDP; a single process without it."""
    if cuda:  # TF32 for float32 matmuls: the float32 parts of training lose nothing that matters, and run faster
        torch.backends.cuda.matmul.allow_tf32 = True
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before NCCL starts, so that each rank talks from its own GPU
    # the other ranks wait while rank 0 writes the weights for inference (26 GB in bfloat16 at 13B): allow more
    # than NCCL's default 10 minutes for a slow shared filesystem
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, device, init_device_mesh(device.type, (world,)))


def compute_dtype(flag: str, device_type: str):
    """--dtype: auto is bfloat16 on CUDA, float32 elsewhere."""
    if flag == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, flag)


def fake_tensors():
    """A mode in which tensors have shapes, dtypes and devices but no data: a step of a 70B model runs on a CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode()


def fake(world: int) -> Dist:
    """Rank 0 of a simulated run of `world` processes: collectives do nothing, every shape is as it would be."""
    import torch.distributed._tools.fake_collectives  # noqa: F401 (fake tensors through collectives, torch < 2.13)
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    # the mesh is built before any FakeTensorMode: building it reads real tensors
    return Dist(0, world, torch.device("cpu"), init_device_mesh("cpu", (world,)))


def local(t):
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


# --- building: activation checkpointing, compile, FSDP2

def recomputed(forward):
    """forward, run under activation checkpointing: its activations are recomputed in backward, not kept.

    A plain function rather than functools.partial(checkpoint, forward): torch.compile traces through this one
    and compiles the checkpointed block, while it leaves a partial of checkpoint uncompiled.
    """
    def run(*args):
        return checkpoint(forward, *args, use_reentrant=False)
    return run


def shard(model, root, d: Dist, compute_dtype, activation_checkpointing: bool = False, compile: bool = False):
    """Per block: checkpointing, then compile; with FSDP, fully_shard each block, then the root (the rest)."""
    for block in model.layers:
        if activation_checkpointing:
            block.forward = recomputed(block.forward)
        if compile:
            block.compile()
    if d.fsdp:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.layers:
            fully_shard(block, mesh=d.mesh, mp_policy=mp)
        fully_shard(root, mesh=d.mesh, mp_policy=mp)


def reshard(root):
    """Free the gathered parameters a no-grad forward leaves behind.

    FSDP2 reshards the root after forward only when a backward follows: after evaluation it keeps the whole of
    the embeddings and the shared head gathered (bfloat16 copies, 650 MB at 13B), and the module's parameters are
    then those full tensors rather than this rank's shards, which is what saving a checkpoint next reads.
    """
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def shard_of(full: torch.Tensor, p) -> torch.Tensor:
    """The part of a full tensor that this rank keeps of parameter p (FSDP2 cuts dim 0 as torch.chunk does)."""
    if not isinstance(p, DTensor):
        return full
    (placement,) = p.placements
    mesh = p.device_mesh
    chunks = full.chunk(mesh.size(), dim=placement.dim)
    rank = mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else full.narrow(placement.dim, 0, 0)


@torch.no_grad()
def load_weights(model, tensors, where: str, optional: str = "exit_heads."):
    """Copy full tensors (name, tensor), one at a time, into the parameters; returns the names of the optional
    ones that were absent.

    Each rank cuts its slice on the CPU and moves only that to its device. Parameters under `optional` may be
    absent (an SFT checkpoint has no ICT heads yet).
    """
    params = dict(model.named_parameters())
    for name, full in tensors:
        if name not in params:
            raise CheckpointError(f"{where}: unexpected weight {name}")
        p = params.pop(name)
        if tuple(full.shape) != tuple(p.shape):
            raise CheckpointError(f"{where}: {name} has shape {tuple(full.shape)}, the model expects {tuple(p.shape)}")
        part = shard_of(full, p)
        assert part.shape == local(p).shape, (name, part.shape, local(p).shape)
        local(p).copy_(part)
    missing = sorted(n for n in params if not n.startswith(optional))
    if missing:
        raise CheckpointError(f"{where}: no weights for {', '.join(missing[:3])}")
    return sorted(params)


# --- checkpoints

def sync(path: str):
    """Flush a file, or a folder's list of entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@torch.no_grad()
def full_weights(model, d: Dist, dtype) -> dict:
    """Every parameter whole, gathered one at a time; rank 0 keeps them on the CPU in `dtype`, the others none."""
    full = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        if d.master:
            full[name] = t.detach().to("cpu", dtype)
    return full


def save_checkpoint(out: str, step: int, root, opt, d: Dist, save_dtype, tokenizer_path: str, **params):
    """out/step_NNNNNNN/: model.safetensors, params.json and tokenizer.model for inference (the weights of
    root.model in save_dtype), and train_state/ (DCP: each rank's shard of the float32 weights and AdamW moments).

    It is written under a temporary name and flushed to disk; only then does the link out/latest switch to it,
    in one atomic rename, so that a crash at any point leaves the previous checkpoint current.
    """
    name = f"step_{step:07d}"
    while os.path.lexists(os.path.join(out, name)):  # the same step written before (by a run started anew): the
        name += "+"  # new one gets a name of its own, so that the old stays whole until `latest` leaves it
    if d.fsdp:  # rank 0's view of the folder decides, whatever a shared filesystem shows the others
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    tmp, final = os.path.join(out, ".tmp_" + name), os.path.join(out, name)
    if d.master:
        for stale in os.listdir(out):  # left by a run killed while writing
            if stale.startswith(".tmp_step_"):
                shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
        os.makedirs(tmp)
    d.barrier()
    model_state, optim_state = get_state_dict(root, opt)
    # every rank writes its own shard in parallel; the files are fsynced (sync_files)
    with quiet_dcp():
        dcp.save({"model": model_state, "optim": optim_state}, no_dist=not d.fsdp,
                 storage_writer=FileSystemWriter(os.path.join(tmp, "train_state"), sync_files=True))
    full = full_weights(root.model, d, save_dtype)
    if d.master:
        save_model(full, root.model.args, tmp, tokenizer_path, step=step, **params)
        for f in ("model.safetensors", "params.json", "tokenizer.model", "train_state", ""):
            sync(os.path.join(tmp, f))
        os.rename(tmp, final)
        link = os.path.join(out, "latest")
        if os.path.lexists(link + ".tmp"):  # left by a run killed at this very line
            os.remove(link + ".tmp")
        os.symlink(name, link + ".tmp")
        sync(out)
        os.replace(link + ".tmp", link)  # the switch to the new checkpoint
        sync(out)
        for old in os.listdir(out):
            if old.startswith("step_") and old != name:
                shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    d.barrier()


@contextlib.contextmanager
def quiet_dcp():
    """Without DCP's notes to itself: that one process saves and loads without a process group (as it should), and
    torch 2.7's own use of tensor.storage()."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        warnings.filterwarnings("ignore", "TypedStorage is deprecated")
        yield


# the only things a DCP metadata file may name: its own record types, tensor dtypes and sizes, a path
DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
    ("torch", "Size"), ("pathlib", "PosixPath")}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in DCP_METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                      torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"refused: the checkpoint's metadata names {module}.{name}, which is not DCP's")


def check_metadata(path: str):
    """Unpickle a DCP .metadata file building nothing but DCP's own records, or raise CheckpointError."""
    try:
        with open(path, "rb") as f:
            MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})")


class SafeReader(FileSystemReader):
    """DCP's reader unpickles its .metadata file with pickle.load: this one checks first that doing so builds
    nothing but DCP's records. (The tensor data DCP reads itself with torch.load(weights_only=True).)"""

    def read_metadata(self, *args, **kwargs):
        check_metadata(os.path.join(str(self.path), ".metadata"))
        return super().read_metadata(*args, **kwargs)


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner reads its non-tensor entries (AdamW's param_groups: lr, betas, ...) with torch.load(
    weights_only=False): this one reads them only if torch.load(weights_only=True) can, i.e. if they are plain
    values, and otherwise records what it refused."""
    refused = None

    def load_bytes(self, read_item, value):
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            self.refused = f"{read_item.dest_index.fqn} ({str(e).splitlines()[-1][:120]})"
            return
        value.seek(0)
        super().load_bytes(read_item, value)


def restore_checkpoint(ckpt: str, root, opt, d: Dist):
    """Weights and AdamW state from ckpt/train_state, resharded to this run's processes, whatever their number."""
    folder = os.path.join(ckpt, "train_state")
    if not os.path.exists(os.path.join(folder, ".metadata")):
        raise CheckpointError(f"{ckpt} has no training state in DCP's format (train_state/.metadata): start anew "
                              f"from its weights with --init {ckpt}")
    check_metadata(os.path.join(folder, ".metadata"))  # here, for one clear line: inside DCP it would be wrapped
    # get_state_dict gives AdamW its state tensors (a step at lr 0) for DCP to load into, each this rank's shard
    model_state, optim_state = get_state_dict(root, opt)
    state = {"model": model_state, "optim": optim_state}
    planner = SafePlanner()
    with quiet_dcp():
        dcp.load(state, storage_reader=SafeReader(folder), planner=planner, no_dist=not d.fsdp)
    if planner.refused:
        raise CheckpointError(f"{folder}: refused, unpickling {planner.refused} would need more than plain values")
    set_state_dict(root, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


# --- memory: what a run needs, what it took, by kind

def check_fits(model, d: Dist):
    """Refuse a run whose float32 weights, gradients and AdamW moments alone overflow the device."""
    n_all = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = (4 * n_all + 12 * n_trained) / d.world  # bytes per process, sharded by FSDP
    if d.device.type == "cuda":
        have, where = torch.cuda.get_device_properties(d.device).total_memory, "GPU"
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        where = "process's share of this machine's memory"
    if need > have:
        raise CheckpointError(f"{n_all / 1e9:.1f}B parameters need about {need / 2**30:.0f} GiB per process for "
                              f"float32 weights, gradients and AdamW, more than the {have / 2**30:.0f} GiB of this "
                              f"{where}: use more GPUs with torchrun (plan it with --estimate --nproc N)")


def peak_memory_gib(device) -> float:
    """The process's peak so far: the CUDA allocator's, or on the CPU the resident set's."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kilobytes on Linux



MEMORY_KINDS = {  # FSDPMemTracker's categories, grouped
    "parameters": ("Sharded Param", "Unsharded Param", "Buffer"),
    "gradients": ("Sharded Grad", "Unsharded Grad"),
    "optimizer state": ("OptState",),
    "activations": ("Activation", "Temp", "Inputs"),
    "communication buffers": ("All Gather", "Reduce Scatter"),
}


class PeakMemory:
    """`with PeakMemory(root, opt) as m:` one training step, then m.peak: this rank's bytes at the step's peak, by
    kind, as torch's FSDPMemTracker sees the tensors live (parameters, gradients, AdamW state, inputs, the rest)."""

    def __init__(self, root, opt):
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        self.tracker, self.peak = FSDPMemTracker(mod=root, optm=opt), {}

    def __enter__(self):
        self.tracker.__enter__()
        return self

    def again(self):
        """Call before each further forward of the same modules (gradient accumulation): the tracker's per-module
        records expect one forward each, the step's peak is kept."""
        self.tracker.reset_mod_stats()

    def __exit__(self, *exc):
        self.tracker.__exit__(*exc)
        by_category = {}
        for snapshot in self.tracker.get_tracker_snapshot("peak").values():  # one device
            for k, v in snapshot.items():
                key = getattr(k, "value", k)
                by_category[key] = by_category.get(key, 0) + v
        self.peak = {kind: sum(by_category.get(c, 0) for c in cats) for kind, cats in MEMORY_KINDS.items()}
        self.peak["total"] = by_category["Total"]


class AllocatorPeak:
    """`with AllocatorPeak(device) as m:` ... then m.peak: the most bytes the allocator had handed out at once.

    CUDA keeps that count itself; the CPU allocator does not, so there the profiler records every allocation and
    free, and their running sum gives it.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self.profiler.__exit__(*exc)
        with tempfile.TemporaryDirectory() as tmp:
            self.profiler.export_chrome_trace(os.path.join(tmp, "trace.json"))
            with open(os.path.join(tmp, "trace.json")) as f:
                events = json.load(f)["traceEvents"]
        running = 0
        for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
            running += e["args"]["Bytes"]
            self.peak = max(self.peak, running)


def largest_batch(fits, start: int, start_fits: bool, most: int = 1024) -> tuple[int, bool]:
    """(the largest batch size b <= most with fits(b), whether it is `most`), by doubling and then bisecting:
    a batch that does not fit has no larger one that fits. (0, False) if none fits."""
    lo, hi = (start, None) if start_fits else (0, start)  # fits(lo) holds (0: trivially), fits(hi) does not
    while hi is None:
        if 2 * lo > most:
            return lo, True
        if fits(2 * lo):
            lo *= 2
        else:
            hi = 2 * lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, lo == most


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2**20:.1f} MiB"


def plan_memory(build, d: Dist, simulate: bool, batch_size: int, seq_len: int, grad_accum: int, gpu_memory: float,
                title: str, search: bool = True) -> dict:
    """Each process's peak memory in one training step, by kind; printed, and returned in bytes.

    build() makes the sharded objective, its optimizer and a training step over micro-batches. simulate: the run
    of d.world processes (a fake process group) on fake tensors, which have shapes but no data, so that a step of
    70B runs on a CPU. Otherwise this run's own processes take the step for real, and the allocator's peak is
    printed beside the tracker's. The batch is the worst case: every row seq_len tokens, every token a target.
    With `search`, a simulation also finds the largest batch size that fits gpu_memory (GiB).
    """
    tensors = fake_tensors() if simulate else contextlib.nullcontext()
    with tensors, (contextlib.nullcontext() if simulate else AllocatorPeak(d.device)) as measured:
        objective, opt, step = build()

        def micro(B: int, T: int, tracker=None):
            for _ in range(min(grad_accum, 2)):  # from the second on, each starts as the one before: two show the peak
                if tracker:
                    tracker.again()
                yield (torch.zeros(B, T, dtype=torch.long, device=d.device), torch.arange(B * T, device=d.device),
                       torch.zeros(B * T, dtype=torch.long, device=d.device))

        def peak(B: int) -> dict:
            with PeakMemory(objective, opt) as tracker:
                step(micro(B, seq_len, tracker))
            return tracker.peak

        step(micro(1, 8))  # AdamW makes its state in its first step; the step measured is a later one
        result = peak(batch_size)
    n_params = sum(p.numel() for p in objective.parameters())
    d.say(f"memory of one training step, " + (f"simulated for each of {d.world} processes under torchrun" if simulate
          else f"measured on {d.world} process{'es' * (d.world > 1)} ({d.device})") + f": {n_params / 1e6:,.1f}M "
          f"parameters, float32 weights and AdamW, {title}")
    for kind, n in result.items():
        d.say(f"  {kind:<24}{gib(n):>10}")
    if not simulate:
        total = d.sum(torch.tensor([measured.peak], dtype=torch.float64)).item() / d.world
        d.say(f"  {'measured (allocator)':<24}{gib(total):>10}   (mean over the processes)")
        return result
    budget = 0.9 * gpu_memory * 2 ** 30  # the rest for the CUDA context, NCCL's buffers, fragmentation
    fits = result["total"] <= budget
    print(f"{'fits' if fits else 'does not fit'} in {gpu_memory:g} GiB per GPU (with 10% of it left for the CUDA "
          "context, NCCL and fragmentation)")
    if search:
        with tensors:
            best, capped = largest_batch(lambda b: peak(b)["total"] <= budget, batch_size, fits)
        print(f"largest --batch_size that fits: {best}{' or more' if capped else ''}" if best else "no --batch_size "
              "fits: use more GPUs (--nproc), --activation_checkpointing or a shorter --max_seq_len")
    return result
