"""Whether a run fits before it starts: the float32 weights, gradients and AdamW moments of its model, against the
memory of the device each process has (the memory plan, memory.py, simulates a whole step instead)."""
import os

import torch

from flags import FlagError
from model import ModelArgs


def check_fits(args: ModelArgs, n_heads: int, frozen_trunk: bool, shard_size: int, device: torch.device):
    """Refuse, before taking any memory, a run whose float32 weights (4 bytes a parameter), gradients and AdamW
    moments (12 more a trained one), sharded over shard_size processes (HSDP: a group's; else all of them; one
    process: 1), overflow the device. n_heads: the exits' own norm and head, besides the shared one."""
    head = args.vocab_size * args.dim + args.dim
    block = 2 * args.dim * args.head_dim * (args.n_heads + args.n_kv_heads) + 3 * args.dim * args.hidden_dim
    n_all = args.vocab_size * args.dim + args.n_layers * (block + 2 * args.dim) + head * (1 + n_heads)
    need = (4 * n_all + 12 * (head * n_heads if frozen_trunk else n_all)) / shard_size
    have = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if need > have:
        raise FlagError(f"{n_all / 1e9:.1f}B parameters need about {need / 2**30:.0f} GiB per process for "
                              f"float32 weights, gradients and AdamW sharded over {shard_size} process(es), more "
                              f"than the {have / 2**30:.0f} GiB here: use more GPUs with torchrun, or larger --hsdp "
                              "groups (plan it with --estimate --nproc N)")
