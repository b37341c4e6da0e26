"""jaxprfaas: Prefill-as-a-Service serving of hybrid-attention LLMs on JAX.

The public face of the project: the Python API, the CLI and the process launcher. The heavy
subpackages (`jaxprfaas.model`, `jaxprfaas.runtime`, ...) are imported lazily so that
`import jaxprfaas` and the scheduler-only commands never pay for a JAX import.
"""

__version__ = "0.1.0"
