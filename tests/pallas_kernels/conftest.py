"""Shared oracles for the KDA kernel tests.

fla-core 0.6.0's pure-torch `naive_recurrent_kda` is loaded straight from the wheel's
`fla/ops/kda/naive.py` (torch + einops only): importing the `fla` package would need triton.
The wheel is downloaded once into ~/.cache/jaxprfaas; no network is a failure, not a skip.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

FLA_WHEEL = "fla_core-0.6.0-py3-none-any.whl"
CACHE = pathlib.Path(os.environ.get("JAXPRFAAS_CACHE", pathlib.Path.home() / ".cache" / "jaxprfaas"))


def _fla_naive_path() -> pathlib.Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    wheel = CACHE / FLA_WHEEL
    if not wheel.exists():
        tmp = CACHE / f"download-{os.getpid()}"  # xdist workers may download at once: each its own folder
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "fla-core==0.6.0", "-d", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0 or not (tmp / FLA_WHEEL).exists():
            pytest.fail(f"could not download fla-core 0.6.0 (the test oracle) into {CACHE}:\n{r.stdout}\n{r.stderr}")
        (tmp / FLA_WHEEL).replace(wheel)
        tmp.rmdir()
    out = CACHE / "fla-core-0.6.0" / "fla_ops_kda_naive.py"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")  # xdist workers may race: write then rename
        with zipfile.ZipFile(wheel) as z:
            tmp.write_bytes(z.read("fla/ops/kda/naive.py"))
        tmp.replace(out)
    return out


@pytest.fixture(scope="session")
def fla_naive():
    """fla-core 0.6.0 `naive_recurrent_kda` wrapped to take and return numpy arrays."""
    import torch

    path = _fla_naive_path()
    spec = importlib.util.spec_from_file_location("fla_core_kda_naive", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def run(q, k, v, g, beta, scale=None, initial_state=None):
        t = lambda x: torch.from_numpy(np.asarray(x, np.float32).copy())  # noqa: E731
        h0 = None if initial_state is None else t(initial_state)
        o, S = mod.naive_recurrent_kda(t(q), t(k), t(v), t(g), t(beta), scale=scale, initial_state=h0,
                                       output_final_state=True)
        return o.numpy(), S.numpy()

    return run


@pytest.fixture(scope="session")
def kin():
    """The helpers of kda_inputs.py (random inputs, numpy gate, rel_err); tests are not a package."""
    spec = importlib.util.spec_from_file_location("kda_inputs", pathlib.Path(__file__).with_name("kda_inputs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
