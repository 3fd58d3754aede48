"""Status and error paths through SkyPilot's real local API server (no cloud needed)."""

from __future__ import annotations

from support.cli import assert_one_line_error


def test_endpoint_of_a_missing_cluster(cli, sky_api_server):
    result = cli("endpoint", "no-such-cluster")  # not llm-atc's, and SkyPilot knows no such cluster
    assert_one_line_error(result, "no deployment or training run named 'no-such-cluster'")
    assert result.exit_code == 3


def test_down_of_a_missing_cluster(cli, sky_api_server):
    result = cli("down", "-y", "no-such-cluster")
    assert_one_line_error(result, "no deployment or training run named 'no-such-cluster'")
    assert result.exit_code == 3


def test_status_reconciles_a_cluster_that_is_gone(cli, sky_api_server):
    from llm_atc.registry import Record, Registry

    registry = Registry()
    registry.add(
        Record(
            name="meta-llama/Llama-2-7b-hf",
            kind="serve",
            model="meta-llama/Llama-2-7b-hf",
            cluster="gone-cluster",
            status="RUNNING",
            cloud="gcp",
            accelerator="A100:1",
            endpoint="http://10.0.0.1:8000",
        )
    )
    assert sky_api_server.get(sky_api_server.status()) == []
    result = cli("status")
    assert result.exit_code == 0, result
    row = next(line for line in result.stdout.splitlines() if "gone-cluster" in line)
    assert "DOWN (no cluster)" in row  # torn down outside llm-atc: shown for a day with why it ended
    assert registry.find("gone-cluster").status == "DOWN"
    with registry._connect() as conn:  # a day later it is left out, but for --all
        conn.execute("UPDATE deployments SET updated_at = updated_at - 86401 WHERE cluster = 'gone-cluster'")
    assert "gone-cluster" not in cli("status").stdout
    shown = cli("status", "--all")
    assert "gone-cluster" in shown.stdout and "DOWN" in shown.stdout


def test_status_with_nothing_recorded(cli):
    result = cli("status")
    assert result.exit_code == 0
    assert "No deployments" in result.stdout
