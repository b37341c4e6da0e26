"""jaxprfaas: Prefill-as-a-Service serving of hybrid-attention LLMs on JAX.

The public face of the project: the Python API (`LLM`, `Client`, `SamplingParams`), the CLI
and the process launcher. Attributes load lazily, so `import jaxprfaas` and the scheduler-only
commands never pay for a JAX import.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "Client", "SamplingParams", "RequestOutput"]


def __getattr__(name):
    if name in __all__:
        from jaxprfaas import api
        return getattr(api, name)
    raise AttributeError(f"module 'jaxprfaas' has no attribute {name!r}")
