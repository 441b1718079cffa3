"""One training engine for every trained method (issue 22).

- :mod:`harness.train.config`: :class:`EngineConfig`, the loop's and the layout's settings every task config carries.
- :mod:`harness.train.task`: the :class:`Task` a method implements (what to build, the loss of a batch, hooks,
  inner updates of some groups before each step, what to write at the end) and the parameter :class:`Group` it
  trains.
- :mod:`harness.train.engine`: :func:`run`, the one loop (schedule, clipping, autocast, accumulation,
  checkpoint and resume, the NaN stop, the divergence note, progress and per-step logs).
- :mod:`harness.train.parallel`: FSDP2 under torchrun, mixed precision, activation checkpointing, the frozen
  teacher's placement, each data shard's seed.
- :mod:`harness.train.checkpoint`: sharded, resharding checkpoints with ``torch.distributed.checkpoint``.
"""
