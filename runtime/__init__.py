"""Serving runtime: engines, the hybrid cache pool, state export and gRPC transfer.

Knows nothing of routing policy (that is `jaxprfaas.scheduler`).
"""
