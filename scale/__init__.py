"""The scale layer: what training needs on real hardware, on top of the plain trainer.

  fsdp.py        processes under torchrun, FSDP2 sharding, activation checkpointing and compile of the blocks
  checkpoint.py  the training state through torch.distributed.checkpoint, every process writing its own shard
  fused_ce.py    the SoFT loss computed in chunks, never holding an exit's full logits
  memory.py      the memory plan: one training step simulated for N GPUs (--estimate) or measured
  fit.py         whether a model's weights, gradients and AdamW state fit before a run starts
"""
