import faulthandler, sys, time, os
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
faulthandler.dump_traceback_later(45, repeat=True)
import jax, jax.numpy as jnp
from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
from jaxprfaas.pallas_kernels import reference
def run(B,T,H,st,diag="auto"):
    ks = jax.random.split(jax.random.PRNGKey(T+H), 6)
    q = jax.random.normal(ks[0], (B,T,H,128)).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B,T,H,128)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B,T,H,128)).astype(jnp.bfloat16)
    g = -jnp.exp(jax.random.uniform(ks[3], (B,T,H,128), minval=-6., maxval=-2.))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B,T,H)))
    h0 = jax.random.normal(ks[5], (B,H,128,128))
    t=time.time(); print("start", B,T,H,st,diag, flush=True)
    f = jax.jit(lambda *a: chunk_kda_pallas(*a, initial_state=h0, output_final_state=True, use_qk_l2norm=True, state_impl=st, diag=diag))
    o,S = jax.block_until_ready(f(q,k,v,g,beta))
    o2,S2 = reference.chunk_kda(q,k,v,g,beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    e = float(jnp.abs(o.astype(jnp.float32)-o2.astype(jnp.float32)).max()/jnp.abs(o2.astype(jnp.float32)).max())
    print("done", B,T,H,st,diag, f"{time.time()-t:.1f}s err {e:.2e}", flush=True)
for a in sys.argv[1:]:
    B,T,H,st,diag = a.split(":")
    run(int(B),int(T),int(H),st,diag)
