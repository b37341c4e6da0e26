"""Scheduling: routing, control loops, the PrfaaS throughput model and a simulator.

Pure Python + numpy. Never imports JAX: it must run on a box with no accelerator and simulate
thousands of requests per second.
"""
