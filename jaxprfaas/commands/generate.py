"""`jaxprfaas generate`: run prompts (token ids) through the model and print the new tokens.

`--prompt-ids 1,2,3` prints the generated ids of one prompt; `--prompts FILE.jsonl` (one JSON
list of token ids per line) prints one JSON line per prompt: {"index": i, "token_ids": [...]}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxprfaas.errors import JaxprfaasError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset name (tiny, kimi-linear-48b-a3b) or checkpoint dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="comma-separated token ids of one prompt")
    src.add_argument("--prompts", type=Path, help="JSONL file, one list of token ids per line")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-token-ids", default="", help="comma-separated ids that end a sequence")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--reference", action="store_true",
                   help="use the single-process reference loop instead of the serving engines")


def _ids(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise JaxprfaasError(f"{what} must be comma-separated integers, got {text!r}") from None


def run(args) -> int:
    from jaxprfaas.model.checkpoint import load_model
    from jaxprfaas.model.generate import SamplingParams

    from jaxprfaas.jobs import read_prompts
    prompts = ([_ids(args.prompt_ids, "--prompt-ids")] if args.prompt_ids
               else [ids for _, ids in read_prompts(args.prompts)])
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed,
                            stop_token_ids=tuple(_ids(args.stop_token_ids, "--stop-token-ids")))
    model = load_model(args.model, dtype=args.dtype)
    outputs = _generate(model, prompts, params, reference=args.reference)
    if args.prompt_ids:
        print(" ".join(map(str, outputs[0])))
    else:
        for i, toks in enumerate(outputs):
            print(json.dumps({"index": i, "token_ids": toks}))
    return 0


def _generate(model, prompts, params, reference: bool):
    try:
        from jaxprfaas.runtime.local import generate_with_engines
    except ImportError:
        reference = True
    if reference:
        from jaxprfaas.model.generate import generate
        return generate(model, prompts, params)
    return generate_with_engines(model, prompts, params)
