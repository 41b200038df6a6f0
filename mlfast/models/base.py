"""What every peer model is: a pure ``nn.Module`` from sparse ids (+ dense) to one logit.

A model owns ONE flat embedding table [V, W] over all fields (the reader's global ids index it
directly: one lookup, no per-field loop). ``W`` is ``embedding_dim`` plus one extra column when the
model has a first-order (linear) term: that column is the per-feature linear weight, so a single
lookup serves both. ``forward(sparse, dense)`` = ``forward_embedded(embedding(sparse), dense)``; the
fused GPU path calls ``forward_embedded`` with rows it looked up itself for all peers at once.

Models never touch devices, optimizers or precision: the trainer owns those.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

EMBEDDING_INIT_STD = 1e-4  # FuxiCTR's default embedding initialiser: N(0, 1e-4)


@dataclass(frozen=True)
class FeatureSchema:
    """What a model needs to know about its input: the flat table's field layout and dense width."""

    field_offsets: tuple[int, ...]  # F + 1 offsets into the flat table
    field_names: tuple[str, ...] = ()
    num_dense: int = 0  # dense features the model reads (0 = sparse only, FuxiCTR-style)

    def __post_init__(self) -> None:
        offs = tuple(int(x) for x in self.field_offsets)
        object.__setattr__(self, "field_offsets", offs)
        if len(offs) < 2 or offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])):
            raise ValueError(f"field_offsets must start at 0 and not decrease, got {offs[:5]}...")
        if not self.field_names:
            object.__setattr__(self, "field_names", tuple(f"f{i}" for i in range(len(offs) - 1)))
        elif len(self.field_names) != len(offs) - 1:
            raise ValueError(f"{len(self.field_names)} field names for {len(offs) - 1} fields")

    @property
    def num_fields(self) -> int:
        return len(self.field_offsets) - 1

    @property
    def table_rows(self) -> int:
        return self.field_offsets[-1]

    @classmethod
    def from_data(cls, data: Any, use_dense: bool = False) -> "FeatureSchema":
        """Schema of a ``CTRData`` (dense features included only when ``use_dense``)."""
        return cls(
            field_offsets=tuple(int(x) for x in np.asarray(data.field_offsets)),
            field_names=tuple(data.field_names),
            num_dense=int(data.num_dense) if use_dense else 0,
        )

    def to_dict(self) -> dict:
        return {"field_offsets": list(self.field_offsets), "field_names": list(self.field_names),
                "num_dense": self.num_dense}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSchema":
        return cls(tuple(d["field_offsets"]), tuple(d["field_names"]), int(d["num_dense"]))


class FlatEmbedding(nn.Module):
    """One [V, W] table for all fields: global ids [B, F] -> rows [B, F, W] in one gather."""

    def __init__(self, num_rows: int, width: int, init_std: float = EMBEDDING_INIT_STD):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_rows, width))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(sparse, self.weight)


class CTRModel(nn.Module):
    """Base class of the model zoo. Subclasses set ``name``/``uses_linear`` and implement
    ``forward_embedded``; ``__init__`` keyword arguments are the per-peer options (``dcn:layers=4``)."""

    name: ClassVar[str] = ""
    uses_linear: ClassVar[bool] = False  # the table gets one extra column: first-order weights

    def __init__(self, schema: FeatureSchema, embedding_dim: int = 16):
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.schema = schema
        self.embedding_dim = int(embedding_dim)
        self.embedding = FlatEmbedding(schema.table_rows, self.embedding_width)

    @property
    def embedding_width(self) -> int:
        return self.embedding_dim + (1 if self.uses_linear else 0)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B] for global ids ``sparse`` [B, F] (and ``dense`` [B, num_dense])."""
        return self.forward_embedded(self.embedding(sparse), dense)

    def forward_embedded(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B] from looked-up rows ``emb`` [B, F, W] (W = ``embedding_width``)."""
        raise NotImplementedError

    def split_embedded(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(vectors [B, F, D], first-order weights [B, F] or None) from looked-up rows."""
        if self.uses_linear:
            return emb[..., : self.embedding_dim], emb[..., self.embedding_dim]
        return emb, None


# ---------------------------------------------------------------------------------------------
# Registry and peer specs ("dcn:layers=4,dropout=0.1")

MODELS: dict[str, type[CTRModel]] = {}


def register(cls: type[CTRModel]) -> type[CTRModel]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    MODELS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class PeerSpec:
    """One peer: a registered model name, its options, and a unique label (CSV column, logs)."""

    model: str
    options: dict = dataclasses.field(default_factory=dict)
    label: str = ""

    def __str__(self) -> str:
        if not self.options:
            return self.model
        return self.model + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in self.options.items())

    def to_dict(self) -> dict:
        return {"model": self.model, "options": dict(self.options), "label": self.label}

    @classmethod
    def from_dict(cls, d: dict) -> "PeerSpec":
        return cls(d["model"], dict(d["options"]), d["label"])


def _format_value(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "-".join(str(x) for x in v)
    return str(v)


def _option_types(cls: type[CTRModel]) -> dict[str, tuple[Any, Any]]:
    """{option: (annotation, default)} from the model's ``__init__`` signature."""
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    out = {}
    for pname, p in sig.parameters.items():
        if pname in ("self", "schema") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[pname] = (hints.get(pname, type(p.default)), p.default)
    return out


def _convert(text: str, annotation: Any, model: str, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    try:
        if annotation is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation in (int, float, str):
            return annotation(text)
        if origin in (tuple, list, Sequence, typing.Sequence) or annotation in (tuple, list):
            elem = args[0] if args else int
            parts = [p for p in text.replace("x", "-").split("-") if p] if elem is int else text.split("-")
            return tuple(elem(p) for p in parts)
        if origin is typing.Union and type(None) in args:  # Optional[X]
            if text.lower() in ("none", ""):
                return None
            return _convert(text, next(a for a in args if a is not type(None)), model, key)
        if origin is typing.Literal:
            if text not in args:
                raise ValueError
            return text
    except (ValueError, TypeError):
        pass
    else:
        if origin is not typing.Literal:
            return text
    raise ValueError(f"peer {model!r}: option {key}={text!r} is not a valid {_type_name(annotation)}")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + "|".join(typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def parse_peer(text: str) -> PeerSpec:
    """Parse ``"name"`` or ``"name:key=value,key=value"`` against the registry (no ``eval``)."""
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in MODELS:
        raise ValueError(f"unknown peer {name!r}; available: {', '.join(sorted(MODELS))}")
    types = _option_types(MODELS[name])
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))) if rest else ():
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"peer {name!r}: option {item!r} must be key=value")
        if key not in types:
            raise ValueError(f"peer {name!r}: unknown option {key!r}; options: {', '.join(sorted(types))}")
        options[key] = _convert(value.strip(), types[key][0], name, key)
    return PeerSpec(name, options)


def parse_peers(items: str | Sequence[str | PeerSpec]) -> list[PeerSpec]:
    """Parse a peer list (``"deepfm,dcn:layers=4"`` or a list) and give each a unique label.

    A comma starts a new peer unless what follows is ``key=value`` (an option of the previous one).
    The same model twice gets labels ``dcn`` and ``dcn_2``.
    """
    if isinstance(items, str):
        chunks: list[str] = []
        for part in items.split(","):
            if chunks and "=" in part and ":" not in part.split("=")[0]:
                chunks[-1] += "," + part
            else:
                chunks.append(part)
        items = [c for c in (c.strip() for c in chunks) if c]
    specs = [it if isinstance(it, PeerSpec) else parse_peer(it) for it in items]
    if not specs:
        raise ValueError("no peers given")
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        base = s.label or s.model
        seen[base] = seen.get(base, 0) + 1
        out.append(dataclasses.replace(s, label=base if seen[base] == 1 else f"{base}_{seen[base]}"))
    return out


def build_model(spec: PeerSpec | str, schema: FeatureSchema, embedding_dim: int | None = None) -> CTRModel:
    """Instantiate a registered model; ``embedding_dim`` applies unless the spec sets its own."""
    if isinstance(spec, str):
        spec = parse_peer(spec)
    opts = dict(spec.options)
    if embedding_dim is not None and "embedding_dim" not in opts:
        opts["embedding_dim"] = embedding_dim
    return MODELS[spec.model](schema, **opts)


ModelFactory = Callable[[FeatureSchema], CTRModel]
