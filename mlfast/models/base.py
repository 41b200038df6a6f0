"""What every peer model is: a pure ``nn.Module`` from looked-up embedding rows (+ dense) to one logit.

A model never owns an embedding table: the trainer's ``mlfast.train.tables.PeerTables`` holds every
peer's table in one buffer and looks up all fields of all peers at once. ``forward(emb, dense)``
reads the rows ``emb`` [B, F, W] of its own table, one per field (a multi-hot field arrives already
pooled). ``W`` (``embedding_width``) is ``embedding_dim`` plus one extra column when the model has a
first-order (linear) term: that column is the per-feature linear weight, so one lookup serves both.

Models never touch devices, optimizers or precision: the trainer owns those.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

@dataclass(frozen=True)
class FeatureSchema:
    """What a model needs to know about its input: the flat table's field layout and dense width."""

    field_offsets: tuple[int, ...]  # F + 1 offsets into the flat table (bag fields last)
    field_names: tuple[str, ...] = ()
    num_dense: int = 0  # dense features the model reads (0 = sparse only, FuxiCTR-style)
    num_bags: int = 0  # the last num_bags fields are multi-hot bags, mean-pooled to one row each

    def __post_init__(self) -> None:
        offs = tuple(int(x) for x in self.field_offsets)
        object.__setattr__(self, "field_offsets", offs)
        if len(offs) < 2 or offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])):
            raise ValueError(f"field_offsets must start at 0 and not decrease, got {offs[:5]}...")
        if not self.field_names:
            object.__setattr__(self, "field_names", tuple(f"f{i}" for i in range(len(offs) - 1)))
        elif len(self.field_names) != len(offs) - 1:
            raise ValueError(f"{len(self.field_names)} field names for {len(offs) - 1} fields")
        if not 0 <= self.num_bags <= len(offs) - 1:
            raise ValueError(f"num_bags={self.num_bags} for {len(offs) - 1} fields")

    @property
    def num_fields(self) -> int:
        return len(self.field_offsets) - 1

    @property
    def num_onehot(self) -> int:
        """Fields with one id per row (the columns of ``sparse``)."""
        return self.num_fields - self.num_bags

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
            num_bags=int(data.num_bags),
        )

    def to_dict(self) -> dict:
        return {"field_offsets": list(self.field_offsets), "field_names": list(self.field_names),
                "num_dense": self.num_dense, "num_bags": self.num_bags}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSchema":
        return cls(tuple(d["field_offsets"]), tuple(d["field_names"]), int(d["num_dense"]), int(d.get("num_bags", 0)))


class CTRModel(nn.Module):
    """Base class of the model zoo. Subclasses set ``name``/``uses_linear`` and implement
    ``forward(emb, dense)``; ``__init__`` keyword arguments are the per-peer options (``dcn:layers=4``)."""

    name: ClassVar[str] = ""
    uses_linear: ClassVar[bool] = False  # the table gets one extra column: first-order weights
    # False only for models without embedding vectors (LR): their rows are just the linear weight,
    # so a 1.8M-row table is not 17x larger than what the model reads.
    uses_vectors: ClassVar[bool] = True

    def __init__(self, schema: FeatureSchema, embedding_dim: int = 16):
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.schema = schema
        self.embedding_dim = int(embedding_dim)

    @property
    def embedding_width(self) -> int:
        return (self.embedding_dim if self.uses_vectors else 0) + (1 if self.uses_linear else 0)

    def forward(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B] from looked-up rows ``emb`` [B, F, W] (W = ``embedding_width``; one row per
        field of the schema, bag fields pooled) and ``dense`` [B, num_dense] when the schema has it."""
        raise NotImplementedError

    def split_embedded(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(vectors [B, F, D], first-order weights [B, F] or None) from looked-up rows."""
        if emb.shape[-1] != self.embedding_width:
            raise ValueError(
                f"{self.name}: embedded rows must be [B, F, {self.embedding_width}], got {tuple(emb.shape)}"
            )
        if self.uses_linear:
            # split, not two slices: its backward is one concatenation, where each slice's backward
            # zero-fills a [B, F, W] gradient and the two are then added (1.02x the DeepFM step)
            v, w = emb.split([emb.shape[-1] - 1, 1], dim=-1)
            return v, w.squeeze(-1)
        return emb, None

    def dense_input(self, dense: torch.Tensor | None) -> torch.Tensor | None:
        """``dense`` checked against the schema, or None when the model reads no dense features."""
        nd = self.schema.num_dense
        if nd == 0:
            return None
        if dense is None or dense.ndim != 2 or dense.shape[1] != nd:
            got = None if dense is None else tuple(dense.shape)
            raise ValueError(f"{self.name}: the schema has {nd} dense features; expected dense [B, {nd}], got {got}")
        return dense


# ---------------------------------------------------------------------------------------------
# Registry and peer specs ("dcn:layers=4,dropout=0.1")

MODELS: dict[str, type[CTRModel]] = {}

# Other names the literature and FuxiCTR use for the registered models.
ALIASES: dict[str, str] = {
    "pnn": "ipnn",
    "wide_deep": "widedeep",
    "wide&deep": "widedeep",
    "wdl": "widedeep",
    "autoint+": "autoint",
    "autointplus": "autoint",
    "dcn_v2": "dcnv2",
    "dcn-v2": "dcnv2",
    "logistic": "lr",
}


def canonical_name(name: str) -> str:
    """The registered name for ``name`` or one of its aliases (case-insensitive)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown peer {name!r}; available: {', '.join(sorted(MODELS))}"
                         f" (aliases: {', '.join(sorted(ALIASES))})")
    return key


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
    """The option value ``text`` as ``annotation`` (bool, int, float, str, tuple[X, ...],
    Literal[...], Optional[X]); ValueError naming the peer, option and bad value otherwise."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    value: Any = None
    try:
        if origin in (typing.Union, types.UnionType) and type(None) in args:  # Optional[X] / X | None
            if text.lower() in ("none", ""):
                return None
            inner = [a for a in args if a is not type(None)]
            return _convert(text, inner[0], model, key)
        if annotation is bool:
            value = {"1": True, "true": True, "yes": True, "on": True,
                     "0": False, "false": False, "no": False, "off": False}[text.lower()]
        elif annotation in (int, float, str):
            value = annotation(text)
        elif origin in (tuple, list, collections.abc.Sequence) or annotation in (tuple, list):
            elem = args[0] if args else int
            # "400-400-400" (or "400x400"); an empty value is the empty tuple (no hidden layers).
            parts = text.replace("x", "-").split("-") if elem in (int, float) else text.split("-")
            value = tuple(elem(p) for p in parts if p)
        elif origin is typing.Literal:
            if text not in args:
                raise ValueError(text)
            value = text
        else:
            raise TypeError(f"option {key} of {model!r} has an unsupported annotation {annotation!r}")
    except (ValueError, KeyError):
        raise ValueError(
            f"peer {model!r}: option {key}={text!r} is not a valid {_type_name(annotation)}"
        ) from None
    return value


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + "|".join(typing.get_args(annotation))
    if origin in (tuple, list, collections.abc.Sequence):
        elem = (typing.get_args(annotation) or (int,))[0]
        return f"'-'-separated list of {getattr(elem, '__name__', elem)}"
    return getattr(annotation, "__name__", str(annotation))


def parse_peer(text: str) -> PeerSpec:
    """Parse ``"name"`` or ``"name:key=value,key=value"`` against the registry (no ``eval``).

    Example::

        >>> from mlfast.models import parse_peer
        >>> parse_peer("dcn:layers=4,mlp=256-256")
        PeerSpec(model='dcn', options={'layers': 4, 'mlp': (256, 256)}, label='')
    """
    name, _, rest = text.strip().partition(":")
    name = canonical_name(name)
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

    Example::

        >>> from mlfast.models import parse_peers
        >>> [p.label for p in parse_peers("deepfm,dcn:layers=4,dropout=0.1,dcn")]
        ['deepfm', 'dcn', 'dcn_2']
    """
    if isinstance(items, str):
        chunks: list[str] = []
        for part in items.split(","):
            if chunks and "=" in part and ":" not in part.split("=")[0]:
                chunks[-1] += "," + part
            else:
                chunks.append(part)
        items = [c for c in (c.strip() for c in chunks) if c]
    specs = [_checked(it) if isinstance(it, PeerSpec) else parse_peer(it) for it in items]
    if not specs:
        raise ValueError("no peers given")
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        base = s.label or s.model
        seen[base] = seen.get(base, 0) + 1
        out.append(dataclasses.replace(s, label=base if seen[base] == 1 else f"{base}_{seen[base]}"))
    return out


def _checked(spec: PeerSpec) -> PeerSpec:
    """A programmatic PeerSpec with its model name canonical and its option names known."""
    name = canonical_name(spec.model)
    types = _option_types(MODELS[name])
    unknown = sorted(set(spec.options) - set(types))
    if unknown:
        raise ValueError(f"peer {name!r}: unknown option(s) {', '.join(unknown)}; options: {', '.join(sorted(types))}")
    return spec if name == spec.model else dataclasses.replace(spec, model=name)


def build_model(spec: PeerSpec | str, schema: FeatureSchema, embedding_dim: int | None = None) -> CTRModel:
    """Instantiate a registered model; ``embedding_dim`` applies unless the spec sets its own.

    Example::

        >>> from mlfast.models import FeatureSchema, build_model
        >>> m = build_model("deepfm:mlp=32-32", FeatureSchema((0, 10, 25, 40)), embedding_dim=8)
        >>> m.eval()(torch.randn(2, 3, m.embedding_width)).shape   # 2 samples x 3 fields, 8 + 1 columns
        torch.Size([2])
    """
    spec = parse_peer(spec) if isinstance(spec, str) else _checked(spec)
    opts = dict(spec.options)
    if embedding_dim is not None and "embedding_dim" not in opts:
        opts["embedding_dim"] = embedding_dim
    return MODELS[spec.model](schema, **opts)


ModelFactory = Callable[[FeatureSchema], CTRModel]
