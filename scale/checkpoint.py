"""Checkpoints of a sharded run: the training state through torch.distributed.checkpoint (DCP), the weights for
inference streamed into one model.safetensors.

Every process writes its own shard of the float32 weights and AdamW moments in parallel (train_state/), and a run
saved with N processes resumes with M: DCP reshards on load. DCP unpickles its metadata and its non-tensor
entries; here it may do so only where that builds DCP's own records and plain values (SafeReader, SafePlanner).
"""
import contextlib
import json
import os
import pickle
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from checkpoints import CheckpointError


@contextlib.contextmanager
def quiet_dcp():
    """Without DCP's notes to itself: torch 2.7's own use of tensor.storage()."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TypedStorage is deprecated")
        yield


def save_train_state(folder: str, root, opt, group=None):
    """folder/train_state/: this process's shard of the weights and AdamW's state, the files fsynced; DCP's own
    collectives go through `group` (the side group that may wait for file I/O)."""
    model_state, optim_state = get_state_dict(root, opt)
    with quiet_dcp():
        dcp.save({"model": model_state, "optim": optim_state}, process_group=group,
                 storage_writer=FileSystemWriter(os.path.join(folder, "train_state"), sync_files=True))


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@torch.no_grad()
def save_full_weights(folder: str, model, master: bool, dtype):
    """folder/model.safetensors, the weights for inference in `dtype`, written by rank 0 one tensor at a time.

    Each process casts its own shard of a parameter to dtype before they gather it whole (in bfloat16 half the
    bytes of float32), and rank 0 writes the tensor and lets it go: no process holds more than one whole
    parameter, and rank 0 no copy of the model. The safetensors header is known before any data (every name, shape
    and offset), so the file is written front to back; it gets the permissions the user's umask gives any file.
    """
    params, header, offset = list(model.named_parameters()), {"__metadata__": {"format": "pt"}}, 0
    for name, p in params:
        size = p.numel() * dtype.itemsize
        header[name] = dict(dtype=SAFETENSORS_DTYPES[dtype], shape=list(p.shape), data_offsets=[offset, offset + size])
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-aligned
    f = open(os.path.join(folder, "model.safetensors"), "wb") if master else None
    try:
        if master:
            f.write(len(head).to_bytes(8, "little") + head)
        for name, p in params:
            whole = p.detach().to(dtype)  # cast this process's shard first, then gather
            whole = whole.full_tensor() if isinstance(whole, DTensor) else whole
            if master:
                f.write(whole.cpu().contiguous().view(torch.uint8).numpy().data)
    finally:
        if f:
            f.close()


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


def check_train_state(ckpt: str):
    """A training state in DCP's format that unpickles into nothing but DCP's records, or one clear line."""
    folder = os.path.join(ckpt, "train_state")
    if not os.path.exists(os.path.join(folder, ".metadata")):
        raise CheckpointError(f"{ckpt} has no training state in DCP's format (train_state/): a checkpoint of one "
                              "process resumes in one process (python sorted_train.py --resume), or start anew from "
                              f"its weights with --init {ckpt}")
    check_metadata(os.path.join(folder, ".metadata"))  # here, for one clear line: inside DCP it would be wrapped


def restore_train_state(ckpt: str, root, opt, group=None):
    """Weights and AdamW state from ckpt/train_state, resharded to this run's processes, whatever their number."""
    folder = os.path.join(ckpt, "train_state")
    # get_state_dict gives AdamW its state tensors (a step at lr 0) for DCP to load into, each this rank's shard
    model_state, optim_state = get_state_dict(root, opt)
    state = {"model": model_state, "optim": optim_state}
    planner = SafePlanner()
    with quiet_dcp():
        dcp.load(state, storage_reader=SafeReader(folder), planner=planner, process_group=group)
    if planner.refused:
        raise CheckpointError(f"{folder}: refused, unpickling {planner.refused} would need more than plain values")
    set_state_dict(root, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
