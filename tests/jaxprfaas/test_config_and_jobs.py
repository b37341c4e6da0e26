"""Deployment files are validated with errors naming the key; batch jobs resume without redoing work."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxprfaas.config import load_deployment
from jaxprfaas.errors import ConfigError


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "jaxprfaas.cli", *args], capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.mark.parametrize("text,message", [
    ("link:\n  gbsp: 1\n", "unknown key 'link.gbsp' (known: cross_datacenter, gbps, insecure, latency_ms, streams, tls, token)"),
    ("clusters:\n  pd:\n    decode: {platform: tpu}\n", "clusters.pd.decode.platform must be cpu or gpu, got 'tpu'"),
    ("policy:\n  threshold: lots\n", "policy.threshold must be int, got str 'lots'"),
    ("link: {streams: 0}\n", "link.streams must be in 1..64, got 0"),
    ("clusters: [1, 2]\n", "clusters must be a mapping, got list"),
])
def test_bad_deployment_file_names_the_key(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_deployment(str(f))
    assert str(e.value) == f"{f}: {message}"
    r = cli("run", str(f))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {f}: {message}"


def test_plaintext_across_datacenters_is_refused(tmp_path):
    from jaxprfaas.roles.prefill import transport_security
    from jaxprfaas.runtime.transfer import check_transport_security
    cfg = load_deployment("local-demo", {"link.insecure": False})
    with pytest.raises(ConfigError, match="refusing to start in plaintext"):
        check_transport_security(transport_security(cfg), cross_datacenter=True, link="link")


def test_interrupted_job_finishes_without_redoing_or_losing(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "token_ids": list(range(3, 3 + n))}) + "\n"
                               for i, n in enumerate([5, 80, 12, 150, 33, 61, 9, 120, 70, 3])))
    job = tmp_path / "job.yaml"
    job.write_text("job:\n  deployment: local-demo\n  prompts: prompts.jsonl\n  output: out.jsonl\n"
                   "  sampling: {max_tokens: 24}\n  concurrency: 1\n  overrides: {threshold: 50}\n")
    out = tmp_path / "out.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "jaxprfaas.cli", "run", str(job), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)   # the launcher and (through PDEATHSIG) its children
    p.wait()
    before = out.read_text()
    done_before = [json.loads(l)["id"] for l in before.splitlines()]
    assert 3 <= len(done_before) < 10
    r = cli("run", str(job), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    after = out.read_text()
    assert after.startswith(before)                       # nothing rewritten
    ids = [json.loads(l)["id"] for l in after.splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(10))  # nothing lost, nothing twice
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["outputs"] == 10 and set(summary["routes"]) == {"prfaas", "local"}
    assert (tmp_path / "out.metrics.png").is_file()
