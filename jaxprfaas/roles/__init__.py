"""The processes of a deployment: router, prefill worker (PrfaaS pod or PD-P), decode worker (PD-D).

Each role runs as its own OS process (`jaxprfaas serve --role ...`), serves gRPC with the
standard health service, writes a ready file once warmed up, and drains on SIGINT/SIGTERM.
"""

ROLES = ("router", "prefill", "decode")
