"""Checkpoint loading errors name the tensor; Orbax round trips; the CLI prints one error line."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_oracle as H
from jaxprfaas.errors import CheckpointError, ConfigError
from jaxprfaas.model.checkpoint import load_hf_checkpoint, restore_params, save_params


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    H.make_reference(d, seed=5)
    return d


def _rewrite(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    t = load_file(str(src / "model.safetensors"))
    edit(t)
    save_file(t, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(ckpt, tmp_path):
    d = _rewrite(ckpt, tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.A_log"):
        load_hf_checkpoint(d)


def test_unexpected_tensor_is_named(ckpt, tmp_path):
    d = _rewrite(ckpt, tmp_path / "u", lambda t: t.update({"model.layers.0.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.extra\.weight"):
        load_hf_checkpoint(d)


def test_wrong_shape_names_tensor_and_both_shapes(ckpt, tmp_path):
    name = "model.layers.3.self_attn.kv_b_proj.weight"
    d = _rewrite(ckpt, tmp_path / "s", lambda t: t.update({name: np.ones((64, 15), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[64, 15\], expected \[64, 16\]"):
        load_hf_checkpoint(d)


def test_bad_config_and_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hf_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    with pytest.raises(ConfigError, match="need linear_attn_config.full_attn_layers"):
        load_hf_checkpoint(tmp_path / "c")


def test_cli_bad_checkpoint_is_one_line(ckpt, tmp_path):
    d = _rewrite(ckpt, tmp_path / "cli", lambda t: t.pop("lm_head.weight"))
    r = subprocess.run([sys.executable, "-m", "jaxprfaas.cli", "generate", "--model", str(d),
                        "--prompt-ids", "1,2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {d}: missing tensor lm_head.weight"]


def test_orbax_round_trip(ckpt, tmp_path):
    m = load_hf_checkpoint(ckpt, dtype="float32")
    save_params(m, tmp_path / "orbax")
    r = restore_params(tmp_path / "orbax")
    x = np.random.default_rng(0).integers(3, 512, (1, 20))
    a, _ = m.prefill(x, impl="xla")
    b, _ = r.prefill(x, impl="xla")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(m, tmp_path / "orbax")
