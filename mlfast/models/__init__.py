"""The model zoo: every peer model, registered by name (importing this module registers them all).

Example::

    >>> from mlfast.models import FeatureSchema, build_model, parse_peers
    >>> schema = FeatureSchema((0, 100, 250, 400))
    >>> peers = [build_model(p, schema) for p in parse_peers("deepfm,dcn:layers=2")]
    >>> [type(m).__name__ for m in peers]
    ['DeepFM', 'DCN']
"""
from .base import (
    ALIASES,
    MODELS,
    CTRModel,
    FeatureSchema,
    FlatEmbedding,
    PeerSpec,
    build_model,
    canonical_name,
    parse_peer,
    parse_peers,
    register,
)
from .autoint import AutoInt
from .dcn import DCN
from .dcnv2 import DCNv2
from .deepfm import DeepFM
from .fibinet import FiBiNET
from .fm import FM
from .ipnn import IPNN
from .lr import LR
from .wide_deep import WideDeep
from .xdeepfm import XDeepFM

__all__ = [
    "ALIASES", "MODELS", "CTRModel", "FeatureSchema", "FlatEmbedding", "PeerSpec", "build_model",
    "canonical_name", "parse_peer", "parse_peers", "register",
    "AutoInt", "DCN", "DCNv2", "DeepFM", "FiBiNET", "FM", "IPNN", "LR", "WideDeep", "XDeepFM",
]
