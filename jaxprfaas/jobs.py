"""Batch jobs: prompts from JSONL through a deployment, outputs to JSONL, a metrics summary.

A job file (`configs/jobs/*.yaml`) names the deployment, the prompts, the output and the
sampling. Each output line is appended and flushed as soon as its request finishes, so an
interrupted job loses nothing; a restart skips every id already in the output (a torn last
line from a crash is dropped and redone), so nothing is done twice either.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxprfaas.errors import ConfigError, JaxprfaasError

_JOB_KEYS = {"name", "deployment", "model", "prompts", "output", "metrics", "sampling", "concurrency", "overrides"}


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    deployment: Any            # preset name, YAML path or mapping
    model: str
    prompts: Path
    output: Path
    metrics: Path
    sampling: dict
    concurrency: int
    overrides: dict


def load_job(path: str | Path) -> Job:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read job ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("job"), dict):
        raise ConfigError(f"{path}: a job file has a top-level 'job:' mapping")
    j = data["job"]
    unknown = set(j) - _JOB_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key 'job.{sorted(unknown)[0]}' (known: {', '.join(sorted(_JOB_KEYS))})")
    for key in ("prompts", "output"):
        if not isinstance(j.get(key), str):
            raise ConfigError(f"{path}: job.{key} must be a file path")
    base = path.parent
    dep = j.get("deployment", "local-demo")
    if isinstance(dep, str) and (base / dep).is_file():
        dep = str(base / dep)
    output = base / j["output"]
    conc = j.get("concurrency", 8)
    if not isinstance(conc, int) or conc < 1:
        raise ConfigError(f"{path}: job.concurrency must be an integer >= 1, got {conc!r}")
    sampling = j.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise ConfigError(f"{path}: job.sampling must be a mapping")
    return Job(name=j.get("name", path.stem), deployment=dep, model=str(j.get("model", "tiny")),
               prompts=base / j["prompts"], output=output,
               metrics=base / j.get("metrics", str(Path(j["output"]).with_suffix(".metrics.json"))),
               sampling=sampling, concurrency=conc, overrides=dict(j.get("overrides") or {}))


def read_prompts(path: Path) -> list[tuple[str, list[int]]]:
    """Lines are {"id": ..., "token_ids": [...]} or a bare list (its id is the line number)."""
    if not path.is_file():
        raise JaxprfaasError(f"prompts file {path} not found")
    out, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise JaxprfaasError(f"{path}:{n}: not JSON ({e.msg})") from None
        rid, ids = (str(rec.get("id", n)), rec.get("token_ids")) if isinstance(rec, dict) else (str(n), rec)
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise JaxprfaasError(f"{path}:{n}: expected token_ids, a non-empty list of integers")
        if rid in seen:
            raise JaxprfaasError(f"{path}:{n}: duplicate id {rid!r}")
        seen.add(rid)
        out.append((rid, ids))
    return out


def done_ids(output: Path) -> set[str]:
    """Ids already in the output; a torn last line (crash mid-write) is cut off so it is redone."""
    if not output.is_file():
        return set()
    raw = output.read_bytes()
    keep = raw[:raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        with open(output, "r+b") as f:
            f.truncate(len(keep))
    ids = set()
    for line in keep.decode().splitlines():
        if line.strip():
            ids.add(str(json.loads(line)["id"]))
    return ids


def run_job(job: Job, progress: bool = True) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxprfaas.api import LLM, SamplingParams

    prompts = read_prompts(job.prompts)
    try:
        params = SamplingParams(**job.sampling)
    except TypeError as e:
        raise ConfigError(f"job.sampling: {e}") from None
    job.output.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(job.output)
    todo = [(rid, ids) for rid, ids in prompts if rid not in done]
    lock = threading.Lock()
    if todo:
        with LLM(job.model, deployment=job.deployment, max_concurrency=job.concurrency, **job.overrides) as llm, \
                open(job.output, "a") as out, \
                Progress(TextColumn(f"[bold]{job.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         disable=not progress) as bar:
            task = bar.add_task("", total=len(prompts), completed=len(prompts) - len(todo))

            def record(o):
                line = json.dumps({"id": o.request_id, "token_ids": o.token_ids, "route": o.route,
                                   "finish_reason": o.finish_reason, "metrics": o.metrics})
                with lock:
                    out.write(line + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                    bar.advance(task)

            llm.generate([ids for _, ids in todo], params, request_ids=[rid for rid, _ in todo], on_done=record)
    summary = summarize(job)
    return summary


def summarize(job: Job) -> dict:
    recs = [json.loads(l) for l in job.output.read_text().splitlines() if l.strip()]
    by_route: dict[str, list] = {}
    for r in recs:
        by_route.setdefault(r["route"], []).append(r)
    summary = {"job": job.name, "outputs": len(recs), "routes": {k: len(v) for k, v in by_route.items()},
               "tokens": sum(len(r["token_ids"]) for r in recs),
               "bytes_transferred": sum(r["metrics"]["bytes_transferred"] for r in recs)}
    for route, rs in by_route.items():
        ttft = [r["metrics"]["ttft_s"] for r in rs]
        summary[f"ttft_p50_{route}"] = float(np.percentile(ttft, 50))
        summary[f"ttft_p90_{route}"] = float(np.percentile(ttft, 90))
    job.metrics.parent.mkdir(parents=True, exist_ok=True)
    job.metrics.write_text(json.dumps(summary, indent=1))
    _plot(by_route, job.metrics.with_suffix(".png"), job.name)
    return summary


def _plot(by_route: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for route, rs in sorted(by_route.items()):
        ttft = np.sort([r["metrics"]["ttft_s"] for r in rs])
        a.step(ttft, np.arange(1, len(ttft) + 1) / len(ttft), where="post", label=f"{route} ({len(rs)})")
        b.scatter([r["metrics"]["uncached_tokens"] for r in rs], [r["metrics"]["ttft_s"] for r in rs], s=10,
                  label=route)
    a.set(xlabel="TTFT (s)", ylabel="fraction of requests", title="TTFT CDF per route")
    b.set(xlabel="uncached prompt tokens", ylabel="TTFT (s)", title="TTFT vs prompt length")
    a.legend()
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
