"""Training configuration: one typed dataclass shared by the CLI, the Python API and checkpoints."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mlfast.ops.backends import KERNELS
from mlfast.ops.mutual_loss import MUTUAL_KINDS
from mlfast.ops.sparse_optim import SPARSE_OPTIMIZERS

ENGINES = ("auto", "plain", "fused")
REGIMES = ("joint", "finetune")
DEFAULT_BATCH_SIZE = 4096
# One limit for every backend, checked once here (the fused loss kernel allows up to
# mlfast.kernels.mutual_loss.MAX_PEERS; a test keeps this below it).
MAX_PEERS = 16
PARALLEL = ("data", "peers", "both")  # mlfast.dist.topology
DIST_BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class TrainConfig:
    """Everything that decides a training run (data paths excluded).

    ``batch_size=None`` picks 4096, halved until an epoch has at least 64 steps (not below 128, nor
    above the training rows), so the small real samples train sensibly with the same defaults as
    full Criteo.
    """

    peers: list[str] = field(default_factory=lambda: ["deepfm", "dcn"])
    embedding_dim: int = 16
    epochs: int = 3
    batch_size: int | None = None
    lr: float = 1e-3
    embedding_l2: float = 1e-5  # FuxiCTR's embedding_regularizer, on the rows each batch touches
    net_l2: float = 0.0  # L2 on dense (non-embedding) weights, as Adam weight_decay
    # mutual learning
    alpha: float = 1.0
    mutual: str = "kl"
    alpha_warmup_steps: int = 0  # alpha ramps linearly from 0 over this many steps
    regime: str = "joint"  # "joint": mutual from scratch; "finetune": solo pretrain, then mutual
    finetune_epochs: int = 2
    finetune_lr: float | None = None  # None: same as lr
    # schedule
    eval_every: int = 0  # validate every N steps as well as after each epoch (0: per epoch only)
    patience: int = 2  # stop after this many evaluations without any peer improving
    lr_decay: float = 0.1  # multiply the learning rate by this when validation does not improve
    min_lr: float = 1e-6
    max_steps: int | None = None  # stop after this many steps (all epochs together)
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at each evaluation)
    # execution
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    bf16: bool = False  # bf16 autocast of the models' matmuls (CUDA, or CPUs with AVX512-BF16 / AMX)
    engine: str = "auto"  # "plain": nn.Embedding + dense Adam (the reference); "fused": sparse tables
    kernels: str = "auto"  # fused engine's op backends: auto | triton | numba | reference (mlfast.ops.backends)
    sparse_optimizer: str = "adam"  # fused engine's embedding optimizer: adam (lazy) | adagrad | sgd
    cuda_graph: bool = True  # on CUDA: capture the whole step in a CUDA graph (GraphedStep)
    graph_fallback: bool = False  # a failed graph capture runs the step eagerly instead of stopping
    # divergence: a peer whose mean training BCE is non-finite or above this stops the run
    max_loss: float = 20.0
    skip_bad_batches: bool = False  # skip (and count) batches whose loss is non-finite / above max_loss
    use_dense: bool = False  # feed the transformed numeric columns to the models too
    num_threads: int | None = None  # torch CPU threads (None: torch's default)
    progress: bool = True
    tensorboard: bool = False  # also write TensorBoard scalars to <run>/tensorboard
    # multi-process runs (mlfast.dist; torchrun or --nproc): how ranks split the work, how often a rank's
    # copies of the other peers are refreshed (1: logits exchanged every step), the collective backend
    parallel: str = "data"  # data | peers | both
    exchange_every: int = 1
    backend: str = "auto"  # auto (NCCL on CUDA, gloo on the CPU) | nccl | gloo

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, value: Any, expected: str) -> None:
            raise ValueError(f"{name}={value!r}: expected {expected}")

        if isinstance(self.peers, str):
            self.peers = [self.peers]
        if not self.peers:
            bad("peers", self.peers, "at least one peer")
        if len(self.peers) > MAX_PEERS:
            bad("peers", self.peers, f"at most {MAX_PEERS} peers")
        if self.kernels not in KERNELS:
            bad("kernels", self.kernels, "one of " + "|".join(KERNELS))
        if not self.max_loss > 0:
            bad("max_loss", self.max_loss, "a positive number")
        if self.mutual not in MUTUAL_KINDS:
            bad("mutual", self.mutual, "one of " + "|".join(MUTUAL_KINDS))
        if self.engine not in ENGINES:
            bad("engine", self.engine, "one of " + "|".join(ENGINES))
        if self.regime not in REGIMES:
            bad("regime", self.regime, "one of " + "|".join(REGIMES))
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            bad("sparse_optimizer", self.sparse_optimizer, "one of " + "|".join(SPARSE_OPTIMIZERS))
        for name in ("epochs", "embedding_dim", "finetune_epochs"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "an integer >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            bad("batch_size", self.batch_size, "an integer >= 1")
        for name in ("lr", "min_lr"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                bad(name, v, "a positive number")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            bad("finetune_lr", self.finetune_lr, "a positive number")
        if self.alpha < 0 or not math.isfinite(self.alpha):
            bad("alpha", self.alpha, "a number >= 0")
        if not 0 < self.lr_decay <= 1:
            bad("lr_decay", self.lr_decay, "a number in (0, 1]")
        for name in ("embedding_l2", "net_l2"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), "a number >= 0")
        for name in ("alpha_warmup_steps", "eval_every", "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), "an integer >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", self.max_steps, "an integer >= 1")
        if self.regime == "finetune" and len(self.peers) < 2:
            bad("regime", self.regime, "at least two peers for mutual fine-tuning")
        if self.parallel not in PARALLEL:
            bad("parallel", self.parallel, "one of " + "|".join(PARALLEL))
        if self.exchange_every < 1:
            bad("exchange_every", self.exchange_every, "an integer >= 1")
        if self.backend not in DIST_BACKENDS:
            bad("backend", self.backend, "one of " + "|".join(DIST_BACKENDS))

    def resolved_batch_size(self, num_train_rows: int) -> int:
        if self.batch_size is not None:
            return self.batch_size
        bs = DEFAULT_BATCH_SIZE
        while bs > 128 and num_train_rows // bs < 64:
            bs //= 2
        return max(1, min(bs, num_train_rows))  # tiny data: one batch per epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in _RETIRED}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


_RETIRED: set[str] = set()  # options stored by older runs that no longer exist
