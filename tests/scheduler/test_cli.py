"""`jaxprfaas plan` and `jaxprfaas simulate` on the case study."""

import json

import pytest

from jaxprfaas.cli import main

KEYS = {"threshold", "n_prfaas", "n_p", "n_d", "p", "lambda_max", "theta_prfaas", "theta_pd_p",
        "theta_pd_d", "egress_gbps"}


def test_plan_json_compares_the_three_deployments(capsys):
    assert main(["plan", "configs/case-studies/paper-1t.yaml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"prfaas_pd", "homogeneous_pd", "naive_heterogeneous"}
    for v in out.values():
        assert KEYS <= set(v)
    pf, homo, naive = out["prfaas_pd"], out["homogeneous_pd"], out["naive_heterogeneous"]
    assert pf["lambda_max"] > naive["lambda_max"] > homo["lambda_max"]
    assert (pf["n_prfaas"], pf["n_p"] + pf["n_d"]) == (4, 8)
    assert homo["threshold"] is None and homo["n_p"] + homo["n_d"] == 12
    assert naive["p"] == 1.0 and naive["n_d"] == 8


def test_plan_table_and_errors(capsys):
    assert main(["plan", "paper-1t"]) == 0
    text = capsys.readouterr().out
    assert "Lambda_max" in text and "prfaas_pd" in text
    assert main(["plan", "no-such-case"]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_simulate_json_and_plots(capsys, tmp_path):
    rc = main(["simulate", "paper-1t", "--rate", "2.0", "--requests", "1500", "--json",
               "--plots", str(tmp_path)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"prfaas_pd", "homogeneous_pd", "naive_heterogeneous"}
    for v in out.values():
        assert {"completed", "rejected", "lost", "throughput", "ttft_mean", "ttft_p50", "ttft_p90",
                "ttft_p99", "link_util_mean"} <= set(v)
        assert v["lost"] == 0 and v["completed"] + v["rejected"] == 1500
    assert out["homogeneous_pd"]["link_util_mean"] == 0.0
    for png in ("ttft_cdf.png", "lambda_vs_t.png", "link_util.png"):
        assert (tmp_path / png).stat().st_size > 1000


@pytest.mark.parametrize("argv, msg", [
    (["--requests", "0"], "--requests"),
    (["--deployments", "nope"], "unknown deployments"),
    (["--link-gbps", "-1"], "--link-gbps"),
])
def test_simulate_user_errors(capsys, argv, msg):
    assert main(["simulate", "paper-1t", *argv]) == 2
    assert msg in capsys.readouterr().err
