"""`jaxprfaas generate` prints tokens for --prompt-ids and JSON lines for --prompts."""

import json
import subprocess
import sys


def cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxprfaas.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_generate_prompt_ids_and_jsonl_agree(tmp_path):
    one = cli("generate", "--model", "tiny", "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "5", "--reference")
    assert one.returncode == 0, one.stderr
    toks = [int(t) for t in one.stdout.split()]
    assert len(toks) == 5
    f = tmp_path / "p.jsonl"
    f.write_text("[1, 2, 3, 4, 5]\n[7, 8]\n")
    many = cli("generate", "--model", "tiny", "--prompts", str(f), "--max-new-tokens", "5")
    assert many.returncode == 0, many.stderr
    lines = [json.loads(l) for l in many.stdout.splitlines()]
    assert [l["index"] for l in lines] == [0, 1]
    assert lines[0]["token_ids"] == toks and len(lines[1]["token_ids"]) == 5


def test_generate_bad_input_is_one_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("[1, 2]\n{\"x\": 1}\n")
    r = cli("generate", "--model", "tiny", "--prompts", str(f))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {f}:2: expected token_ids, a non-empty list of integers"
    r = cli("generate", "--model", "tiny", "--prompt-ids", "1,600")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert lines[0].endswith("token ids must be in [0, 512), got min 1 max 600")
