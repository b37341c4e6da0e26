"""`ModelConfig`: the shape of a Kimi Linear model, as data.

One frozen dataclass holds every `config.json` field that changes the computation; presets
name the shapes we test and benchmark, and `from_hf` reads a real checkpoint's config. Nothing
here imports JAX, so the scheduler can size states (`HybridState.nbytes`) without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from jaxprfaas.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    # 0-indexed layer ids that are MLA (full attention); every other layer is KDA.
    mla_layers: tuple[int, ...]
    # dense SwiGLU MLP in the first `first_k_dense_replace` layers, MoE after.
    intermediate_size: int
    first_k_dense_replace: int = 1
    rms_norm_eps: float = 1e-5
    # KDA (linear attention)
    kda_num_heads: int = 32
    kda_head_dim: int = 128
    conv_kernel_size: int = 4
    # MLA (NoPE, no q-LoRA)
    num_attention_heads: int = 32
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    kv_a_layernorm_eps: float = 1e-6  # TF / HF remote code (vLLM uses rms_norm_eps)
    # MoE
    num_experts: int = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 1024
    routed_scaling_factor: float = 2.446
    moe_renormalize: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    # The HF remote code's aliasing quirk: routing weights include the correction bias.
    moe_biased_weights: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Storage dtype of weights/activations ("float32" for tests, "bfloat16" for serving).
    dtype: str = "float32"

    # ---- derived -------------------------------------------------------------------------
    @property
    def kda_layers(self) -> tuple[int, ...]:
        mla = set(self.mla_layers)
        return tuple(i for i in range(self.num_hidden_layers) if i not in mla)

    def is_mla(self, layer: int) -> bool:
        return layer in self.mla_layers

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and self.num_experts > 0

    @property
    def kda_dim(self) -> int:
        return self.kda_num_heads * self.kda_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one token's MLA cache entry: [c_kv | k_pe]."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Stable hash of everything that shapes the state (used by the wire format)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "kda_num_heads",
                     "kda_head_dim", "conv_kernel_size", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        bad = [i for i in self.mla_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"model config: MLA layer ids {bad} outside 0..{self.num_hidden_layers - 1}")
        if self.num_experts and self.num_experts_per_token > self.num_experts:
            raise ConfigError("model config: num_experts_per_token > num_experts")
        if self.num_experts and self.num_experts % self.num_expert_group:
            raise ConfigError("model config: num_experts must be divisible by num_expert_group")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model config: dtype must be float32|bfloat16|float16, got {self.dtype!r}")

    # ---- construction --------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> "ModelConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None

    @staticmethod
    def from_hf(path_or_dict: str | Path | dict) -> "ModelConfig":
        """Read a Kimi Linear `config.json` (a path to the file or its folder, or the dict)."""
        if isinstance(path_or_dict, dict):
            d, where = path_or_dict, "config dict"
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise ConfigError(f"no config.json at {p}")
            try:
                d = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: not valid JSON ({e})") from None
            where = str(p)
        return _from_hf_dict(d, where)


def _get(d: dict, where: str, *names: str, default: Any = dataclasses.MISSING) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if default is dataclasses.MISSING:
        raise ConfigError(f"{where}: missing key {names[0]!r}")
    return default


def _from_hf_dict(d: dict, where: str) -> ModelConfig:
    n_layers = int(_get(d, where, "num_hidden_layers"))
    lin = d.get("linear_attn_config") or {}
    if "full_attn_layers" in lin:  # 1-indexed, like the checkpoint
        mla = tuple(int(i) - 1 for i in lin["full_attn_layers"])
    elif d.get("layer_types"):
        mla = tuple(i for i, t in enumerate(d["layer_types"]) if t == "full_attention")
    else:
        raise ConfigError(f"{where}: need linear_attn_config.full_attn_layers or layer_types "
                          "(the implicit fallback pattern differs between references)")
    if d.get("q_lora_rank") is not None:
        raise ConfigError(f"{where}: q_lora_rank={d['q_lora_rank']} is not supported (Kimi Linear has none)")
    if d.get("mla_use_nope") is False:
        raise ConfigError(f"{where}: mla_use_nope=false (RoPE MLA) is not supported")
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    dtype = d.get("dtype") or d.get("torch_dtype") or "float32"  # torch default when unset
    try:
        return ModelConfig(
            vocab_size=int(_get(d, where, "vocab_size")),
            hidden_size=int(_get(d, where, "hidden_size")),
            num_hidden_layers=n_layers,
            mla_layers=mla,
            intermediate_size=int(_get(d, where, "intermediate_size")),
            first_k_dense_replace=int(_get(d, where, "first_k_dense_replace", default=0)),
            rms_norm_eps=float(_get(d, where, "rms_norm_eps", default=1e-5)),
            kda_num_heads=int(lin.get("num_heads", _get(d, where, "linear_num_heads", default=32))),
            kda_head_dim=int(lin.get("head_dim", _get(d, where, "linear_head_dim", default=128))),
            conv_kernel_size=int(lin.get("short_conv_kernel_size",
                                         _get(d, where, "linear_conv_kernel_dim", default=4))),
            num_attention_heads=int(_get(d, where, "num_attention_heads")),
            kv_lora_rank=int(_get(d, where, "kv_lora_rank")),
            qk_nope_head_dim=int(_get(d, where, "qk_nope_head_dim")),
            qk_rope_head_dim=int(_get(d, where, "qk_rope_head_dim")),
            v_head_dim=int(_get(d, where, "v_head_dim")),
            num_experts=int(_get(d, where, "num_experts", "num_local_experts", default=0)),
            num_experts_per_token=int(_get(d, where, "num_experts_per_token", "num_experts_per_tok", default=1)),
            num_shared_experts=int(_get(d, where, "num_shared_experts", "n_shared_experts", default=0)),
            moe_intermediate_size=int(_get(d, where, "moe_intermediate_size", default=0)),
            routed_scaling_factor=float(_get(d, where, "routed_scaling_factor", default=1.0)),
            moe_renormalize=bool(_get(d, where, "moe_renormalize", "norm_topk_prob", default=True)),
            num_expert_group=int(_get(d, where, "num_expert_group", "n_group", default=1)),
            topk_group=int(_get(d, where, "topk_group", default=1)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            pad_token_id=d.get("pad_token_id"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            dtype={"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype),
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None


def _kimi_48b() -> ModelConfig:
    full = (4, 8, 12, 16, 20, 24, 27)  # 1-indexed in config.json
    return ModelConfig(
        vocab_size=163840, hidden_size=2304, num_hidden_layers=27,
        mla_layers=tuple(i - 1 for i in full), intermediate_size=9216, first_k_dense_replace=1,
        rms_norm_eps=1e-5, kda_num_heads=32, kda_head_dim=128, conv_kernel_size=4,
        num_attention_heads=32, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, num_experts=256, num_experts_per_token=8, num_shared_experts=1,
        moe_intermediate_size=1024, routed_scaling_factor=2.446, moe_renormalize=True,
        pad_token_id=163839, bos_token_id=163584, eos_token_id=163586, dtype="bfloat16",
    )


PRESETS: dict[str, ModelConfig] = {
    # 4 layers (3 KDA + 1 MLA), dense first layer, MoE top-2 of 8: the CPU test model.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, mla_layers=(3,),
        intermediate_size=128, first_k_dense_replace=1, kda_num_heads=2, kda_head_dim=16,
        num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
        moe_intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "kimi-linear-48b-a3b": _kimi_48b(),
}
