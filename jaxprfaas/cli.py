"""The `jaxprfaas` command line.

Each subcommand lives in its own module under `jaxprfaas/commands/` exposing
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command
runs, so `jaxprfaas plan` never imports JAX. User errors (`JaxprfaasError`) print one line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from jaxprfaas.errors import JaxprfaasError

# name -> (module, one-line help). Order is the order `--help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jaxprfaas.commands.demo", "run the embedded PrfaaS-PD demo deployment"),
    "generate": ("jaxprfaas.commands.generate", "generate tokens from token-id prompts"),
    "run": ("jaxprfaas.commands.run", "start a deployment or run a batch job from YAML"),
    "serve": ("jaxprfaas.commands.serve", "start one role of a deployment on this host"),
    "plan": ("jaxprfaas.commands.plan", "solve the PrfaaS throughput model for a config"),
    "simulate": ("jaxprfaas.commands.simulate", "simulate deployments of a config"),
    "bench": ("jaxprfaas.commands.bench", "micro-benchmarks (transfer, ...)"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, help_) in COMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            out[name] = (mod, help_)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="jaxprfaas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    avail = _available()
    # Only the chosen command's module is imported (its arguments are needed to parse).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (mod, help_) in avail.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:
            module = importlib.import_module(mod)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except JaxprfaasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
