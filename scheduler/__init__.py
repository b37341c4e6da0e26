"""Scheduling: routing, control loops, the PrfaaS throughput model and a simulator.

Pure Python + numpy. Never imports JAX (nor `jaxprfaas.model` / `jaxprfaas.runtime`): it must
run on a box with no accelerator and simulate thousands of requests per second.

Modules, in dependency order:
  distributions     uncached-length distributions (truncated log-normal, empirical)
  profiles          per-(hardware, model) T_prefill(l), S_kv(l), decode capacity; YAML loading
  throughput_model  the paper's Eqs. (1)-(8) and the grid-search planner for the 3 deployments
  casestudy         a case-study YAML as typed objects; plans every deployment the same way
  kv_index          global KV index: rolling block hashes -> clusters/nodes, thread-safe
  router            pure per-request placement (threshold, prefix-cache rules, Algorithm 1, SLO)
  controller        dual-timescale control: re-search t (short), convert PD nodes (long)
  fluid_link        the cross-datacenter link as a fluid FIFO queue (for the simulator)
  workload          arrivals (uniform/Poisson/bursty/trace) and length shifts
  simulator         discrete-event simulation with the real router and controller in the loop
  plots             PNG figures (matplotlib imported lazily, only there)
"""
