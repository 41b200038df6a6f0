"""The model zoo: every peer model, registered by name (importing this module registers them all).

Example::

    >>> from mlfast.models import FeatureSchema, build_model, parse_peers
    >>> schema = FeatureSchema((0, 100, 250, 400))
    >>> peers = [build_model(p, schema) for p in parse_peers("deepfm,dcn:layers=2")]
    >>> [type(m).__name__ for m in peers]
    ['DeepFM', 'DCN']
"""
from mlfast.models.base import (
    ALIASES,
    MODELS,
    CTRModel,
    FeatureSchema,
    PeerSpec,
    build_model,
    canonical_name,
    parse_peer,
    parse_peers,
    register,
)
from mlfast.models.autoint import AutoInt
from mlfast.models.dcn import DCN
from mlfast.models.dcnv2 import DCNv2
from mlfast.models.deepfm import DeepFM
from mlfast.models.fibinet import FiBiNET
from mlfast.models.fm import FM
from mlfast.models.ipnn import IPNN
from mlfast.models.lr import LR
from mlfast.models.wide_deep import WideDeep
from mlfast.models.xdeepfm import XDeepFM

__all__ = [
    "ALIASES", "MODELS", "CTRModel", "FeatureSchema", "PeerSpec", "build_model",
    "canonical_name", "parse_peer", "parse_peers", "register",
    "AutoInt", "DCN", "DCNv2", "DeepFM", "FiBiNET", "FM", "IPNN", "LR", "WideDeep", "XDeepFM",
]
