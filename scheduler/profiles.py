"""Per-(hardware, model) profiles: T_prefill(l), S_kv(l) and decode capacity.

These are the measured inputs of the throughput model (Table 4) and the service times of the
simulator. A hardware YAML (`configs/hardware/*.yaml`) gives prefill time and decode capacity
of one instance; the model gives S_kv, either as a table (the paper's Table 5) or computed from
the architecture with the same formula as `jaxprfaas.model.state.state_nbytes` (re-derived
here, because this package must never import the model package, which pulls in JAX).

Units everywhere: tokens, seconds, bytes. Gbps follows the paper's Table 5 convention:
bytes * 8 / 1e9 per second, where bytes = MiB * 2**20.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxprfaas.errors import ConfigError

MIB = 1 << 20
KIB = 1 << 10
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"B": 1, "KiB": KIB, "MiB": MIB, "GiB": 1 << 30}


def gbps(bytes_per_s):
    """Bytes/s -> Gbps (Table 5 convention: MiB * 2^20 * 8 / 1e9 per second)."""
    return bytes_per_s * 8 / 1e9


def bytes_per_s(gbps_: float) -> float:
    return gbps_ * 1e9 / 8


# ---- T_prefill(l) ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PrefillCurve:
    """Prefill time of one instance vs uncached length.

    `table`: measured (length, seconds) points, interpolated piecewise as power laws (linear in
    log-log), extrapolated with the end segments' exponents. `power_law`: a * l**b. A one-point
    table is a constant.
    """

    lengths: tuple[float, ...]
    seconds: tuple[float, ...]

    @staticmethod
    def power_law(a: float, b: float) -> "PrefillCurve":
        # Two points define the same curve exactly under log-log interpolation.
        return PrefillCurve((1.0, 2.0), (a, a * 2.0 ** b))

    @staticmethod
    def through(p0: tuple[float, float], p1: tuple[float, float]) -> "PrefillCurve":
        return PrefillCurve((float(p0[0]), float(p1[0])), (float(p0[1]), float(p1[1])))

    def __post_init__(self):
        if len(self.lengths) != len(self.seconds) or not self.lengths:
            raise ConfigError("prefill curve: need equally many lengths and seconds")
        if any(b <= a for a, b in zip(self.lengths, self.lengths[1:])):
            raise ConfigError(f"prefill curve: lengths must increase, got {self.lengths}")
        if min(self.lengths) <= 0 or min(self.seconds) <= 0:
            raise ConfigError("prefill curve: lengths and seconds must be > 0")

    @property
    def exponents(self) -> np.ndarray:
        ll, ls = np.log(self.lengths), np.log(self.seconds)
        return np.diff(ls) / np.diff(ll)

    def __call__(self, l):
        l = np.maximum(np.asarray(l, dtype=float), 1.0)
        if len(self.lengths) == 1:
            return np.full_like(l, self.seconds[0]) if l.ndim else float(self.seconds[0])
        ll, ls = np.log(self.lengths), np.log(self.seconds)
        b = self.exponents
        x = np.log(l)
        i = np.clip(np.searchsorted(ll, x, side="right") - 1, 0, len(b) - 1)
        out = np.exp(ls[i] + b[i] * (x - ll[i]))
        return out if out.ndim else float(out)

    @functools.cached_property
    def _segments(self):
        ll = [math.log(v) for v in self.lengths]
        ls = [math.log(v) for v in self.seconds]
        b = [(ls[i + 1] - ls[i]) / (ll[i + 1] - ll[i]) for i in range(len(ll) - 1)] or [0.0]
        return ll, ls, b

    def at(self, l: float) -> float:
        """Scalar fast path of `__call__` (the simulator calls it per request)."""
        ll, ls, b = self._segments
        x = math.log(l if l > 1.0 else 1.0)
        i = min(max(bisect.bisect_right(ll, x) - 1, 0), len(b) - 1)
        return math.exp(ls[i] + b[i] * (x - ll[i]))


# ---- S_kv(l) -----------------------------------------------------------------------------

def hybrid_state_nbytes(arch: dict[str, Any], length) -> Any:
    """S_kv(l) of a Kimi Linear HybridState: the formula of `jaxprfaas.model.state.state_nbytes`.

    Per KDA layer H*K*K*4 (fp32 recurrent state) + (W-1)*3*H*K*itemsize (conv tail); per MLA
    layer length*(kv_lora_rank + qk_rope_head_dim)*itemsize; plus 4 bytes (int32 length).
    """
    item = _ITEMSIZE[arch["dtype"]]
    h, k = arch["kda_num_heads"], arch["kda_head_dim"]
    n_mla = len(arch["mla_layers"])
    n_kda = arch["num_hidden_layers"] - n_mla
    per_kda = h * k * k * 4 + (arch["conv_kernel_size"] - 1) * 3 * h * k * item
    per_token = n_mla * (arch["kv_lora_rank"] + arch["qk_rope_head_dim"]) * item
    return n_kda * per_kda + 4 + per_token * (np.asarray(length) if np.ndim(length) else length)


_ARCH_DEFAULTS = {"kda_num_heads": 32, "kda_head_dim": 128, "conv_kernel_size": 4,
                  "kv_lora_rank": 512, "qk_rope_head_dim": 64, "dtype": "bfloat16"}


def arch_from_dict(d: dict, where: str) -> dict[str, Any]:
    """The fields of a model description S_kv depends on (ModelConfig names; HF's
    `linear_attn_config.full_attn_layers`, 1-indexed, is accepted too)."""
    out = {k: d.get(k, v) for k, v in _ARCH_DEFAULTS.items()}
    if "num_hidden_layers" not in d:
        raise ConfigError(f"{where}: model description needs num_hidden_layers")
    out["num_hidden_layers"] = int(d["num_hidden_layers"])
    if "mla_layers" in d:
        out["mla_layers"] = tuple(int(i) for i in d["mla_layers"])
    elif "full_attn_layers" in (d.get("linear_attn_config") or {}):
        out["mla_layers"] = tuple(int(i) - 1 for i in d["linear_attn_config"]["full_attn_layers"])
    else:
        raise ConfigError(f"{where}: model description needs mla_layers (0-indexed MLA layer ids)")
    out["dtype"] = {"bf16": "bfloat16", "fp32": "float32"}.get(out["dtype"], out["dtype"])
    if out["dtype"] not in _ITEMSIZE:
        raise ConfigError(f"{where}: dtype must be one of {sorted(_ITEMSIZE)}, got {out['dtype']!r}")
    return out


@dataclasses.dataclass(frozen=True)
class KvSize:
    """S_kv(l) = table interpolated linearly (exact at the measured points, linear outside)."""

    lengths: tuple[float, ...]
    nbytes: tuple[float, ...]

    @staticmethod
    def linear(fixed: float, per_token: float) -> "KvSize":
        return KvSize((0.0, 1.0), (float(fixed), float(fixed + per_token)))

    @staticmethod
    def from_arch(arch: dict[str, Any]) -> "KvSize":
        f0 = hybrid_state_nbytes(arch, 0)
        return KvSize.linear(f0, hybrid_state_nbytes(arch, 1) - f0)

    @property
    def fixed(self) -> float:
        return self.at(0.0)

    def __call__(self, l):
        x, y = np.asarray(self.lengths), np.asarray(self.nbytes)
        l = np.asarray(l, dtype=float)
        if x.size == 1:
            out = np.full_like(l, y[0])
        else:
            slope_lo = (y[1] - y[0]) / (x[1] - x[0])
            slope_hi = (y[-1] - y[-2]) / (x[-1] - x[-2])
            out = np.interp(l, x, y)
            out = np.where(l < x[0], y[0] + slope_lo * (l - x[0]), out)
            out = np.where(l > x[-1], y[-1] + slope_hi * (l - x[-1]), out)
        return out if out.ndim else float(out)

    @functools.cached_property
    def _pts(self):
        x, y = list(self.lengths), list(self.nbytes)
        if len(x) == 1:
            return x, y, 0.0, 0.0
        return x, y, (y[1] - y[0]) / (x[1] - x[0]), (y[-1] - y[-2]) / (x[-1] - x[-2])

    def at(self, l: float) -> float:
        """Scalar fast path of `__call__`."""
        x, y, s_lo, s_hi = self._pts
        if len(x) == 1:
            return y[0]
        if l <= x[0]:
            return y[0] + s_lo * (l - x[0])
        if l >= x[-1]:
            return y[-1] + s_hi * (l - x[-1])
        i = bisect.bisect_right(x, l) - 1
        return y[i] + (y[i + 1] - y[i]) * (l - x[i]) / (x[i + 1] - x[i])

    def delta(self, l_from, l_to):
        """Bytes to ship when the receiver already holds a prefix of `l_from` tokens: the MLA
        KV of tokens l_from..l_to plus the whole fixed part (a KDA state is valid for one exact
        length only, so it is always resent)."""
        return self(l_to) - self(l_from) + self.fixed


# ---- decode capacity --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecodeCapacity:
    bs_max: int      # largest batch that still meets the per-token SLO
    t_decode: float  # seconds per decode step at that batch (1 / SLO tokens/s)

    @property
    def tokens_per_s(self) -> float:
        return self.bs_max / self.t_decode


# ---- the profile --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Profile:
    """One instance of `hardware` serving `model`."""

    name: str
    gpus_per_instance: int
    prefill: PrefillCurve
    kv: KvSize
    decode: DecodeCapacity | None = None
    rdma_gbps: float = 800.0  # intra-cluster bandwidth per node (PD-P -> PD-D, cache loads)

    def t_prefill(self, l):
        return self.prefill(l)

    def s_kv(self, l):
        return self.kv(l)

    def phi_kv(self, l):
        """Eq. (1): KV throughput of one instance, bytes/s."""
        return self.kv(l) / self.prefill(l)


def _num(d: dict, key: str, where: str) -> float:
    try:
        return float(d[key])
    except KeyError:
        raise ConfigError(f"{where}: missing key {key!r}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} must be a number, got {d[key]!r}") from None


def prefill_from_spec(spec: dict, where: str) -> PrefillCurve:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: prefill must be a mapping")
    if "points" in spec:
        pts = sorted((float(a), float(b)) for a, b in spec["points"])
        return PrefillCurve(tuple(p[0] for p in pts), tuple(p[1] for p in pts))
    if "a" in spec and "b" in spec:
        return PrefillCurve.power_law(_num(spec, "a", where), _num(spec, "b", where))
    raise ConfigError(f"{where}: prefill needs 'points: [[tokens, seconds], ...]' or 'a', 'b' (a*l^b)")


def kv_from_spec(spec: dict, where: str, base_dir: Path | None = None) -> KvSize:
    """`{table: [[tokens, size], ...], unit: MiB}` | `{fixed_bytes, per_token_bytes}` |
    `{model: NAME_OR_PATH}` (configs/models/) | an inline architecture mapping."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: kv must be a mapping")
    if "table" in spec:
        unit = spec.get("unit", "B")
        if unit not in _UNITS:
            raise ConfigError(f"{where}: kv unit must be one of {sorted(_UNITS)}, got {unit!r}")
        pts = sorted((float(a), float(b) * _UNITS[unit]) for a, b in spec["table"])
        return KvSize(tuple(p[0] for p in pts), tuple(p[1] for p in pts))
    if "fixed_bytes" in spec:
        return KvSize.linear(_num(spec, "fixed_bytes", where), _num(spec, "per_token_bytes", where))
    if "model" in spec:
        return KvSize.from_arch(load_model_arch(spec["model"]))
    return KvSize.from_arch(arch_from_dict(spec, where))


def load_model_arch(name_or_path: str) -> dict[str, Any]:
    from jaxprfaas.paths import config_path
    p = config_path("models", name_or_path)
    return arch_from_dict(_read_yaml(p), str(p))


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise ConfigError(f"no such config file: {p}")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return d


def load_hardware(name_or_path: str | Path, kv: KvSize) -> Profile:
    """A profile from `configs/hardware/<name>.yaml` (or a path) for a model whose S_kv is `kv`.
    A `kv:` key in the hardware file (a measured table) overrides the model's."""
    from jaxprfaas.paths import config_path
    p = config_path("hardware", str(name_or_path))
    d = _read_yaml(p)
    where = str(p)
    if "prefill" not in d:
        raise ConfigError(f"{where}: missing key 'prefill'")
    dec = None
    if "decode" in d:
        dd = d["decode"]
        dec = DecodeCapacity(bs_max=int(_num(dd, "bs_max", where)), t_decode=_num(dd, "t_decode", where))
    return Profile(
        name=str(d.get("name", p.stem)),
        gpus_per_instance=int(d.get("gpus_per_instance", 8)),
        prefill=prefill_from_spec(d["prefill"], f"{where}: prefill"),
        kv=kv_from_spec(d["kv"], f"{where}: kv") if "kv" in d else kv,
        decode=dec,
        rdma_gbps=float(d.get("rdma_gbps", 800.0)),
    )
