"""The canonical DiT schema against the official MUG-V state dict, and the official-layout adapter.

- The 10B schema has exactly the official parameter count (10,830,321,984) and, through the
  adapter's name mapping, the official tensors one for one with equal shapes.
- Official layout -> canonical -> official is the identity on a random state dict of a small
  config; the fused qkv/kv rows move from (which, head, dim) to (head, which, dim).
- A missing, extra or misshapen key fails, naming the key and the shapes involved.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from mugv.checkpoints.official_dit import (OfficialLayoutError, canonical_name_to_official,
                                           config_from_official, export_official, import_official,
                                           official_name_to_canonical)
from mugv.core.dit import dit_config, dit_schema

OFFICIAL_10B_PARAMS = 10_830_321_984


def test_10b_schema_equals_official_json(shared_dir):
    official = json.loads((shared_dir / "reference" / "mugv_dit_10b_state_dict.json").read_text())
    tensors = {t["name"]: tuple(t["shape"]) for t in official["tensors"]}
    assert official["header"]["num_params"] == OFFICIAL_10B_PARAMS
    assert sum(int(np.prod(s)) for s in tensors.values()) == OFFICIAL_10B_PARAMS

    schema = dit_schema(dit_config("10B"))
    assert schema.numel == OFFICIAL_10B_PARAMS
    assert len(schema) == len(tensors) == official["header"]["num_tensors"] == 1197
    specs = schema.as_dict()
    seen = set()
    for name, shape in tensors.items():
        canonical = official_name_to_canonical(name)
        assert canonical in specs, f"official {name} -> {canonical} not in the schema"
        assert specs[canonical].shape == shape, (name, specs[canonical].shape, shape)
        assert canonical_name_to_official(canonical) == name
        seen.add(canonical)
    assert seen == set(specs)


def _random_official_state(cfg, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {canonical_name_to_official(p.name): rng.standard_normal(p.shape).astype(np.float32)
            for p in dit_schema(cfg)}


@pytest.fixture(scope="module")
def small():
    # Three layers of the "small" width: 4 heads, so the fused-row reorder is not trivial.
    cfg = dit_config("small", depth=3)
    return cfg, _random_official_state(cfg)


def test_config_from_official_recovers_the_config(small):
    cfg, state = small
    assert config_from_official(state, text_max_len=cfg.text_max_len) == cfg


def test_official_round_trip_is_identity(small):
    cfg, state = small
    canonical = import_official(state, cfg)
    assert sorted(canonical) == sorted(dit_schema(cfg).names)
    back = export_official(canonical, cfg)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    again = import_official(back, cfg)
    for name, value in canonical.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


@pytest.mark.parametrize("official, canonical, groups", [
    ("blocks.1.attn.qkv.weight", "layers.1.self_attn.qkv.weight", 3),
    ("blocks.2.attn.qkv.bias", "layers.2.self_attn.qkv.bias", 3),
    ("blocks.0.cross_attn.kv_linear.weight", "layers.0.cross_attn.kv.weight", 2),
])
def test_fused_rows_become_head_major(small, official, canonical, groups):
    """Official row (which, head, dim) lands at canonical row (head, which, dim)."""
    cfg, state = small
    heads, d = cfg.num_heads, cfg.head_dim
    rows = state[official].shape[0]
    tagged = dict(state)
    tagged[official] = np.broadcast_to(
        np.arange(rows, dtype=np.float32).reshape((rows,) + (1,) * (state[official].ndim - 1)),
        state[official].shape).copy()
    got = import_official(tagged, cfg)[canonical]
    for head in range(heads):
        for which in range(groups):
            for dim in (0, d - 1):
                expected_source = (which * heads + head) * d + dim
                assert np.all(got[(head * groups + which) * d + dim] == expected_source)
    # Unfused projections keep their layout.
    np.testing.assert_array_equal(import_official(state, cfg)["layers.1.self_attn.proj.weight"],
                                  state["blocks.1.attn.proj.weight"])


def test_missing_official_key_is_named_with_its_shape(small):
    cfg, state = small
    missing = {k: v for k, v in state.items() if k != "blocks.2.cross_attn.kv_linear.weight"}
    with pytest.raises(OfficialLayoutError, match=r"blocks\.2\.cross_attn\.kv_linear\.weight \(576, 288\)"):
        import_official(missing, cfg)


def test_extra_official_key_is_named(small):
    cfg, state = small
    with pytest.raises(OfficialLayoutError, match=r"y_embedder\.y_embedding"):
        import_official({**state, "y_embedder.y_embedding": np.zeros((300, 64), np.float32)}, cfg)
    with pytest.raises(OfficialLayoutError, match=r"blocks\.3\.mlp\.fc1\.bias.*3-layer"):
        import_official({**state, "blocks.3.mlp.fc1.bias": np.zeros(1152, np.float32)}, cfg)


def test_misshapen_official_key_names_both_shapes(small):
    cfg, state = small
    bad = {**state, "blocks.1.attn.q_norm.weight": np.ones(48, np.float32)}
    with pytest.raises(OfficialLayoutError,
                       match=r"blocks\.1\.attn\.q_norm\.weight.*\(48,\).*\(72,\)"):
        import_official(bad, cfg)


def test_export_checks_canonical_names_and_shapes(small):
    cfg, state = small
    canonical = import_official(state, cfg)
    with pytest.raises(OfficialLayoutError, match=r"final_layer\.linear\.weight.*\(16, 288\).*\(192, 288\)"):
        export_official({**canonical, "final_layer.linear.weight": np.zeros((16, 288), np.float32)}, cfg)
    with pytest.raises(OfficialLayoutError, match=r"start_token"):
        export_official({k: v for k, v in canonical.items() if k != "start_token"}, cfg)
    with pytest.raises(OfficialLayoutError, match=r"layers\.9\.scale_shift_table"):
        export_official({**canonical, "layers.9.scale_shift_table": np.zeros((6, 288), np.float32)}, cfg)
