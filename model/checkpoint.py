"""Checkpoints: Kimi Linear safetensors in the original naming, and Orbax for our own params.

`load_hf_checkpoint(dir)` reads `config.json` and the safetensors (one file, or shards listed in
`model.safetensors.index.json`) with the names of the checkpoint's own remote code
(`self_attn.q_conv1d`, `block_sparse_moe.experts.{e}.w1`, ...). Every expected tensor is
checked by name and shape before any is used: a missing, unexpected or mis-shaped tensor is a
`CheckpointError` that names it. Weights are built on an abstract model (`nnx.eval_shape`), so
no random init is paid for a model that is about to be overwritten.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprfaas.errors import CheckpointError
from jaxprfaas.model.config import PRESETS, ModelConfig
from jaxprfaas.model.hybrid_lm import HybridLM


@dataclasses.dataclass(frozen=True)
class Target:
    """One parameter of ours, assembled from one or more checkpoint tensors."""
    path: tuple            # attribute/index path inside HybridLM
    sources: tuple         # ((checkpoint name, torch shape), ...)
    combine: Callable      # list of numpy arrays -> array in our layout


def _t(a):                 # torch Linear [out, in] -> ours [in, out]
    return a[0].T


def _same(a):
    return a[0]


def checkpoint_targets(c: ModelConfig) -> list[Target]:
    """The full name/shape map of a Kimi Linear checkpoint for config `c`."""
    d, hk, k, h = c.hidden_size, c.kda_dim, c.kda_head_dim, c.kda_num_heads
    nh = c.num_attention_heads
    out = [Target(("embed",), (("model.embed_tokens.weight", (c.vocab_size, d)),), _same),
           Target(("norm", "weight"), (("model.norm.weight", (d,)),), _same)]
    if not c.tie_word_embeddings:
        out.append(Target(("lm_head",), (("lm_head.weight", (c.vocab_size, d)),), _t))
    for i in range(c.num_hidden_layers):
        p, L = f"model.layers.{i}.", ("layers", i)
        out += [Target(L + ("input_norm", "weight"), ((p + "input_layernorm.weight", (d,)),), _same),
                Target(L + ("post_norm", "weight"), ((p + "post_attention_layernorm.weight", (d,)),), _same)]
        a, A = p + "self_attn.", L + ("attn",)
        if c.is_mla(i):
            out += [
                Target(A + ("q_proj",), ((a + "q_proj.weight", (nh * c.qk_head_dim, d)),), _t),
                Target(A + ("kv_a_proj",), ((a + "kv_a_proj_with_mqa.weight", (c.latent_dim, d)),), _t),
                Target(A + ("kv_a_norm", "weight"), ((a + "kv_a_layernorm.weight", (c.kv_lora_rank,)),), _same),
                Target(A + ("kv_b_proj",), ((a + "kv_b_proj.weight",
                                             (nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)),), _t),
                Target(A + ("o_proj",), ((a + "o_proj.weight", (d, nh * c.v_head_dim)),), _t),
            ]
        else:
            w = c.conv_kernel_size
            out += [Target(A + (n,), ((a + n + ".weight", (hk, d)),), _t) for n in ("q_proj", "k_proj", "v_proj")]
            out += [
                Target(A + ("conv_weight",), tuple((a + f"{n}_conv1d.weight", (hk, 1, w)) for n in "qkv"),
                       lambda xs: np.concatenate([x[:, 0, :] for x in xs], axis=0)),
                Target(A + ("A_log",), ((a + "A_log", (1, 1, h, 1)),), lambda xs: xs[0].reshape(-1)),
                Target(A + ("dt_bias",), ((a + "dt_bias", (hk,)),), _same),
                Target(A + ("f_a_proj",), ((a + "f_a_proj.weight", (k, d)),), _t),
                Target(A + ("f_b_proj",), ((a + "f_b_proj.weight", (hk, k)),), _t),
                Target(A + ("b_proj",), ((a + "b_proj.weight", (h, d)),), _t),
                Target(A + ("g_a_proj",), ((a + "g_a_proj.weight", (k, d)),), _t),
                Target(A + ("g_b_proj",), ((a + "g_b_proj.weight", (hk, k)),), _t),
                Target(A + ("o_norm",), ((a + "o_norm.weight", (k,)),), _same),
                Target(A + ("o_proj",), ((a + "o_proj.weight", (d, hk)),), _t),
            ]
        F = L + ("ffn",)
        if c.is_moe(i):
            m, e, im = p + "block_sparse_moe.", c.num_experts, c.moe_intermediate_size
            stack = lambda xs: np.stack([x.T for x in xs])  # noqa: E731  [E, in, out]
            out += [
                Target(F + ("router",), ((m + "gate.weight", (e, d)),), _t),
                Target(F + ("correction_bias",), ((m + "gate.e_score_correction_bias", (e,)),), _same),
                Target(F + ("w1",), tuple((m + f"experts.{j}.w1.weight", (im, d)) for j in range(e)), stack),
                Target(F + ("w3",), tuple((m + f"experts.{j}.w3.weight", (im, d)) for j in range(e)), stack),
                Target(F + ("w2",), tuple((m + f"experts.{j}.w2.weight", (d, im)) for j in range(e)), stack),
            ]
            if c.num_shared_experts:
                si = im * c.num_shared_experts
                out += [Target(F + ("shared", "gate_proj"), ((m + "shared_experts.gate_proj.weight", (si, d)),), _t),
                        Target(F + ("shared", "up_proj"), ((m + "shared_experts.up_proj.weight", (si, d)),), _t),
                        Target(F + ("shared", "down_proj"), ((m + "shared_experts.down_proj.weight", (d, si)),), _t)]
        else:
            im = c.intermediate_size
            out += [Target(F + ("gate_proj",), ((p + "mlp.gate_proj.weight", (im, d)),), _t),
                    Target(F + ("up_proj",), ((p + "mlp.up_proj.weight", (im, d)),), _t),
                    Target(F + ("down_proj",), ((p + "mlp.down_proj.weight", (d, im)),), _t)]
    return out


class _Reader:
    """Lazy access to the tensors of one or several safetensors files."""

    def __init__(self, directory: Path):
        from safetensors import safe_open
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files and no model.safetensors.index.json")
        self.handles, self.where = {}, {}
        for f in files:
            path = directory / f
            if not path.is_file():
                raise CheckpointError(f"{directory}: shard {f} listed in the index is missing")
            try:
                h = safe_open(str(path), framework="flax")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
            self.handles[f] = h
            for name in h.keys():
                self.where[name] = f

    def shape(self, name: str) -> tuple:
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        a = self.handles[self.where[name]].get_tensor(name)
        return np.asarray(a.astype(jnp.float32)) if a.dtype == jnp.bfloat16 else np.asarray(a)


def _set(model, path: tuple, value) -> None:
    obj = model
    for p in path[:-1]:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    var = getattr(obj, path[-1])
    var.value = jnp.asarray(value, dtype=var.value.dtype)


def load_hf_checkpoint(directory: str | Path, dtype: str | None = None) -> HybridLM:
    """Load a Kimi Linear checkpoint (config.json + safetensors, original names) into a HybridLM."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = ModelConfig.from_hf(directory)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    reader = _Reader(directory)
    targets = checkpoint_targets(config)
    expected = {name: shape for t in targets for name, shape in t.sources}
    missing = [n for n in expected if n not in reader.where]
    if missing:
        raise CheckpointError(f"{directory}: missing tensor {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(reader.where) - set(expected))
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor {unexpected[0]}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, shape in expected.items():
        got = reader.shape(name)
        if got != tuple(shape):
            raise CheckpointError(f"{directory}: tensor {name} has shape {list(got)}, expected {list(shape)}")
    model = nnx.eval_shape(lambda: HybridLM(config, nnx.Rngs(0)))
    for t in targets:
        _set(model, t.path, t.combine([reader.get(n) for n, _ in t.sources]))
    return model


# ---- our own checkpoints (Orbax) ---------------------------------------------------------------

def save_params(model: HybridLM, directory: str | Path) -> None:
    """Save the model's config and parameters with Orbax (directory must not exist)."""
    import orbax.checkpoint as ocp
    directory = Path(directory).absolute()
    if directory.exists():
        raise CheckpointError(f"{directory} already exists")
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "params", nnx.to_pure_dict(state))
    (directory / "jaxprfaas_config.json").write_text(json.dumps(model.config.to_dict(), indent=1))


def restore_params(directory: str | Path) -> HybridLM:
    """Restore a model saved by `save_params`."""
    import orbax.checkpoint as ocp
    directory = Path(directory).absolute()
    cfg_file = directory / "jaxprfaas_config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{directory}: no jaxprfaas_config.json (not a jaxprfaas checkpoint)")
    d = json.loads(cfg_file.read_text())
    d["mla_layers"] = tuple(d["mla_layers"])
    config = ModelConfig(**d)
    abstract = nnx.eval_shape(lambda: HybridLM(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
    with ocp.StandardCheckpointer() as ckpt:
        pure = ckpt.restore(directory / "params", target)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def load_model(spec: str | Path, dtype: str | None = None, seed: int = 0) -> HybridLM:
    """A preset name (random weights), a Kimi Linear checkpoint dir, or a jaxprfaas checkpoint dir."""
    p = Path(spec)
    if p.is_dir():
        if (p / "jaxprfaas_config.json").is_file():
            return restore_params(p)
        return load_hf_checkpoint(p, dtype=dtype)
    if str(spec) not in PRESETS:
        raise CheckpointError(f"model {str(spec)!r} is neither a checkpoint directory nor a preset "
                              f"({', '.join(PRESETS)})")
    config = ModelConfig.preset(str(spec))
    if dtype is not None:
        config = config.replace(dtype=dtype)
    return HybridLM(config, seed=seed)
