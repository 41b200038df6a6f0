"""Training: the configuration, the peers' embedding tables (`PeerTables`, owned by the trainer), the
engines that run one step, the trainer loop, checkpoints and metrics.

Depends on mlfast.io, mlfast.ops and mlfast.models."""
