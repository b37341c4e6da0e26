"""The Kimi Linear hybrid model (KDA + MLA, MoE) in Flax NNX.

Knows nothing of serving: it maps tokens (and an optional `HybridState`) to logits and a new
state. Layers call the KDA kernels only through `jaxprfaas.pallas_kernels`.
"""

from jaxprfaas.model.config import PRESETS, ModelConfig
from jaxprfaas.model.state import state_bytes_split, state_nbytes

__all__ = ["ModelConfig", "PRESETS", "state_nbytes", "state_bytes_split"]

try:
    from jaxprfaas.model.state import HybridState  # noqa: F401

    __all__.append("HybridState")
except ImportError:  # pragma: no cover
    pass
