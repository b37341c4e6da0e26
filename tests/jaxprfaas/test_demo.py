"""`jaxprfaas demo`, the README's main job: both routes used, every output verified."""

import json
import subprocess
import sys


def test_demo_verifies_every_output_on_both_routes():
    r = subprocess.run([sys.executable, "-m", "jaxprfaas.cli", "demo", "--json", "--requests", "16"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["requests"] == 16 and summary["verified"] == 16
    assert summary["routes"]["prfaas"] > 0 and summary["routes"]["local"] > 0
    assert summary["routes"]["prfaas"] + summary["routes"]["local"] == 16
    assert summary["link_bytes"] > 0 and summary["ttft_p90"] > 0
    assert "outputs equal single-process generation" in r.stderr
