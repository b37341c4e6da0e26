"""Profiles: S_kv from a model description equals HybridState's size; tables and units."""

import math

import numpy as np
import pytest

from jaxprfaas.scheduler import profiles as pr


@pytest.mark.parametrize("preset", ["tiny", "kimi-linear-48b-a3b"])
def test_skv_formula_equals_state_nbytes(preset):
    from jaxprfaas.model.config import ModelConfig
    from jaxprfaas.model.state import state_nbytes
    cfg = ModelConfig.preset(preset)
    arch = pr.arch_from_dict(cfg.to_dict(), preset)
    kv = pr.KvSize.from_arch(arch)
    for length in (0, 1, 17, 1000, 131072):
        assert pr.hybrid_state_nbytes(arch, length) == state_nbytes(cfg, length)
        assert kv(length) == pytest.approx(state_nbytes(cfg, length), rel=0, abs=1e-6)
        assert kv.at(length) == pytest.approx(state_nbytes(cfg, length), rel=0, abs=1e-6)


def test_kimi_48b_yaml_matches_stated_split():
    arch = pr.load_model_arch("kimi-linear-48b-a3b")
    assert pr.hybrid_state_nbytes(arch, 0) == 43_417_604
    assert pr.hybrid_state_nbytes(arch, 1) - pr.hybrid_state_nbytes(arch, 0) == 8_064


def test_gbps_convention_table5():
    # Table 5: 701.3 MiB in 1.84 s is 3.19 Gbps (MiB * 2^20 * 8 / 1e9 per second)
    assert pr.gbps(701.3 * pr.MIB / 1.84) == pytest.approx(3.197, abs=1e-3)
    assert pr.bytes_per_s(100) == 12.5e9


def test_prefill_table_exact_at_points_and_power_law_between():
    h200 = pr.load_hardware("h200-kimi-1t", pr.KvSize.linear(0, 1))
    pts = [(1024, 0.44), (8192, 0.72), (32768, 1.84), (131072, 7.40)]
    for l, t in pts:
        assert h200.prefill(l) == pytest.approx(t, rel=1e-12)
        assert h200.prefill.at(l) == pytest.approx(t, rel=1e-12)
    b = math.log(1.84 / 0.72) / math.log(4)
    assert h200.prefill(16384) == pytest.approx(0.72 * 2 ** b, rel=1e-12)
    np.testing.assert_allclose(h200.prefill(np.array([2000.0, 50000.0])),
                               [h200.prefill.at(2000.0), h200.prefill.at(50000.0)])


def test_h20_implied_power_law():
    h20 = pr.load_hardware("h20-kimi-1t", pr.KvSize.linear(0, 1))
    b = math.log(4.27 / 1.83) / math.log(27.5 / 10.2)
    assert h20.prefill.exponents[0] == pytest.approx(b)
    assert b == pytest.approx(0.854, abs=1e-3)
    assert h20.prefill(20000) == pytest.approx(1.83 * (20000 / 10200) ** b)
    assert h20.decode.tokens_per_s == pytest.approx(800)


def test_kv_table_interpolates_and_delta_resends_fixed_part():
    kv = pr.KvSize.linear(100.0, 2.0)
    assert kv(10) == 120.0 and kv.fixed == 100.0
    # receiver holds 10 tokens: ships tokens 10..30 (40 B) plus the whole fixed state
    assert kv.delta(10, 30) == pytest.approx(140.0)
    t = pr.KvSize((1024.0, 8192.0), (10.0, 80.0))
    assert t(4608) == pytest.approx(45.0)
    assert t(0) == pytest.approx(0.0)


def test_bad_configs_name_the_problem(tmp_path):
    from jaxprfaas.errors import ConfigError
    p = tmp_path / "hw.yaml"
    p.write_text("name: x\nprefill: {points: [[100, 1.0], [100, 2.0]]}\n")
    with pytest.raises(ConfigError, match="increase"):
        pr.load_hardware(str(p), pr.KvSize.linear(0, 1))
    p.write_text("name: x\n")
    with pytest.raises(ConfigError, match="prefill"):
        pr.load_hardware(str(p), pr.KvSize.linear(0, 1))
    with pytest.raises(ConfigError, match="mla_layers"):
        pr.arch_from_dict({"num_hidden_layers": 4}, "m")
