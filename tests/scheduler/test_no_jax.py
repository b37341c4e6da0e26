"""The scheduler never imports JAX, Flax or the model/runtime packages (dependency direction)."""

import pathlib
import subprocess
import sys

import jaxprfaas.scheduler as pkg

MODULES = sorted(p.stem for p in pathlib.Path(pkg.__file__).parent.glob("*.py") if p.stem != "__init__")


def test_every_scheduler_module_imports_without_jax():
    assert {"router", "controller", "simulator", "throughput_model", "kv_index", "profiles"} <= set(MODULES)
    code = "\n".join(
        ["import sys"]
        + [f"import jaxprfaas.scheduler.{m}" for m in MODULES]
        + ["import jaxprfaas.commands.plan, jaxprfaas.commands.simulate",
           "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')"
           " or m.startswith(('jaxprfaas.model', 'jaxprfaas.runtime'))]",
           "print(repr(bad))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_plan_command_runs_without_jax(tmp_path):
    code = ("import sys; from jaxprfaas.cli import main; rc = main(['plan', 'paper-1t', '--json']);"
            "assert rc == 0; assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
