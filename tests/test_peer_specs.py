"""Peer specs: ``"deepfm,dcn:layers=4,dropout=0.1,dcn"`` -> typed options, unique labels, models."""
from __future__ import annotations

import typing

import pytest

from mlfast.models import ALIASES, MODELS, FeatureSchema, PeerSpec, build_model, parse_peer, parse_peers
from mlfast.models.base import _convert, _format_value, _option_types

SCHEMA = FeatureSchema((0, 4, 9, 15))


def test_peer_list_labels_and_typed_options():
    specs = parse_peers("deepfm,dcn:layers=4,dropout=0.1,dcn")
    assert [s.model for s in specs] == ["deepfm", "dcn", "dcn"]
    assert [s.label for s in specs] == ["deepfm", "dcn", "dcn_2"]
    assert specs[0].options == {} and specs[2].options == {}
    assert specs[1].options == {"layers": 4, "dropout": 0.1}
    assert type(specs[1].options["layers"]) is int and type(specs[1].options["dropout"]) is float


def test_three_of_a_kind_and_list_input():
    specs = parse_peers(["fm", "fm:embedding_dim=8", PeerSpec("lr"), "fm"])
    assert [s.label for s in specs] == ["fm", "fm_2", "lr", "fm_3"]
    assert specs[1].options == {"embedding_dim": 8}


@pytest.mark.parametrize("text, key, value", [
    ("deepfm:mlp=256-128", "mlp", (256, 128)),
    ("deepfm:mlp=400x400x400", "mlp", (400, 400, 400)),
    ("deepfm:mlp=", "mlp", ()),
    ("deepfm:mlp=64", "mlp", (64,)),
    ("deepfm:batch_norm=false", "batch_norm", False),
    ("deepfm:batch_norm=0", "batch_norm", False),
    ("deepfm:batch_norm=On", "batch_norm", True),
    ("dcnv2:structure=stacked_parallel", "structure", "stacked_parallel"),
    ("dcnv2:low_rank_mixture=yes", "low_rank_mixture", True),
    ("fibinet:bilinear=field_each", "bilinear", "field_each"),
    ("fibinet:reduction_ratio=2", "reduction_ratio", 2.0),
    ("xdeepfm:cin=200-200", "cin", (200, 200)),
    ("autoint:heads=2", "heads", 2),
    ("dcn: layers = 5 ", "layers", 5),
])
def test_option_values_are_typed(text, key, value):
    spec = parse_peer(text)
    assert spec.options == {key: value}
    assert type(spec.options[key]) is type(value)


@pytest.mark.parametrize("text, bad", [
    ("dnc", "'dnc'"),                                  # unknown model
    ("dcn:depth=3", "'depth'"),                        # unknown option
    ("dcn:layers=four", "'four'"),                     # bad int
    ("dcn:layers=2.5", "'2.5'"),
    ("dcn:dropout=high", "'high'"),                    # bad float
    ("dcn:batch_norm=maybe", "'maybe'"),               # bad bool
    ("dcnv2:structure=diagonal", "'diagonal'"),        # not in the Literal
    ("deepfm:mlp=400-abc", "'400-abc'"),               # bad tuple element
    ("dcn:layers", "'layers'"),                        # no '='
])
def test_bad_specs_raise_naming_the_bad_value(text, bad):
    with pytest.raises(ValueError, match=bad):
        parse_peers(text)


def test_literal_error_lists_the_choices():
    with pytest.raises(ValueError, match="parallel|stacked|stacked_parallel|crossnet_only"):
        parse_peer("dcnv2:structure=x")


def test_empty_peer_list():
    with pytest.raises(ValueError, match="no peers"):
        parse_peers(" , ")


@pytest.mark.parametrize("alias, name", [
    ("pnn", "ipnn"), ("PNN", "ipnn"), ("wide_deep", "widedeep"), ("wdl", "widedeep"),
    ("autoint+", "autoint"), ("AutoInt+", "autoint"), ("dcn_v2", "dcnv2"), ("DeepFM", "deepfm"),
])
def test_aliases_resolve_to_registered_names(alias, name):
    spec = parse_peer(alias)
    assert spec.model == name
    assert parse_peers(f"{alias},{alias}")[1].label == f"{name}_2"
    assert type(build_model(PeerSpec(alias), SCHEMA)) is MODELS[name]


def test_programmatic_specs_are_checked():
    specs = parse_peers([PeerSpec("pnn", {"mlp": (8,)}), PeerSpec("ipnn")])
    assert [(s.model, s.label) for s in specs] == [("ipnn", "ipnn"), ("ipnn", "ipnn_2")]
    with pytest.raises(ValueError, match="'depth'|depth"):
        parse_peers([PeerSpec("dcn", {"depth": 2})])
    with pytest.raises(ValueError, match="'nope'"):
        parse_peers([PeerSpec("nope")])


def test_every_alias_points_at_a_registered_model():
    assert set(ALIASES.values()) <= set(MODELS)
    assert not set(ALIASES) & set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_option_is_annotated_and_round_trips(name):
    """Each constructor option has a parseable type and its default survives str -> parse."""
    types = _option_types(MODELS[name])
    assert "embedding_dim" in types
    for key, (annotation, default) in types.items():
        assert annotation in (int, float, bool, str) or typing.get_origin(annotation) in (tuple, typing.Literal), key
        assert _convert(_format_value(default), annotation, name, key) == default
    spec = PeerSpec(name, {k: d for k, (_, d) in types.items()})
    assert parse_peer(str(spec)).options == spec.options


def test_spec_string_and_dict_round_trip():
    spec = parse_peers("dcnv2:layers=2,structure=stacked,mlp=32-16,batch_norm=false")[0]
    assert str(spec) == "dcnv2:layers=2,structure=stacked,mlp=32-16,batch_norm=False"
    assert parse_peer(str(spec)).options == spec.options
    assert PeerSpec.from_dict(spec.to_dict()) == spec


def test_build_model_applies_options():
    m = build_model("dcn:layers=4,mlp=32-16,dropout=0.1", SCHEMA, embedding_dim=6)
    assert tuple(m.cross.weight.shape) == (4, 3 * 6)
    assert [lin.out_features for lin in m.mlp.linears] == [32, 16]
    assert m.mlp.dropout.p == pytest.approx(0.1)
    assert m.embedding_width == 6
    # A spec's own embedding_dim wins over the shared one.
    assert build_model("fm:embedding_dim=3", SCHEMA, embedding_dim=6).embedding_width == 4
    assert build_model("fm", SCHEMA).embedding_width == 17
    m2 = build_model("dcnv2:low_rank_mixture=true,low_rank=5,experts=2,layers=2", SCHEMA, 4)
    assert tuple(m2.cross.U.shape) == (2, 2, 12, 5)
    assert build_model("deepfm:batch_norm=false", SCHEMA).mlp.norms.__len__() == 0


@pytest.mark.parametrize("spec, bad", [
    (PeerSpec("dcn", {"depth": 3}), "depth"),
    ("deepfm:dropout=1.5", "1.5"),
    ("deepfm:dropout=nan", "nan"),
    ("deepfm:mlp=0-4", r"\(0, 4\)"),
    ("dcn:layers=-1", "-1"),
    ("dcnv2:experts=0", "experts=0"),
    ("xdeepfm:cin=", r"cin=\(\)"),
    ("autoint:attention_dim=6,heads=4", "attention_dim=6"),
    ("fibinet:reduction_ratio=0", "reduction_ratio=0"),
])
def test_build_model_rejects_bad_values(spec, bad):
    with pytest.raises(ValueError, match=bad):
        build_model(spec, SCHEMA)


@pytest.mark.parametrize("text, annotation, value", [
    ("3-4", typing.Sequence[int], (3, 4)),
    ("0.5-1", tuple[float, ...], (0.5, 1.0)),
    ("a-b", tuple[str, ...], ("a", "b")),
    ("none", int | None, None),
    ("7", typing.Optional[int], 7),
    ("x", str, "x"),
])
def test_converter_covers_every_supported_annotation(text, annotation, value):
    assert _convert(text, annotation, "m", "k") == value


def test_converter_rejects_bad_optional_and_unsupported_annotations():
    with pytest.raises(ValueError, match="'x' is not a valid int"):
        _convert("x", int | None, "m", "k")
    with pytest.raises(TypeError, match="unsupported annotation"):
        _convert("1", dict, "m", "k")
