"""Multi-process training on torch.distributed: one command line from one CPU to a multi-node GPU
cluster (``torchrun --nproc-per-node N -m mlfast train ...`` or ``mlfast train --nproc N ...``).

* ``launch``: torchrun's environment, process groups, backend choice, ``--nproc``.
* ``topology``: ``--parallel data | peers | both``: ranks as peer groups x data shards.
* ``comm``: the collectives, with per-kind byte counters and errors naming the rank.
* ``sharded_tables``: embedding rows sharded over a data group (all-to-all lookups, owner-side
  fused sparse optimizer step).
* ``layers``: BatchNorm over the data group; dropout masks of a shard's rows as in one process.
* ``data``: each data shard's rows of every global batch.
* ``engine``: one rank's training step (`DistEngine`); ``trainer``: `DistTrainer`;
  ``checkpoint``: sharded checkpoints and their merge; ``run``: ``mlfast train`` as one rank.
"""
