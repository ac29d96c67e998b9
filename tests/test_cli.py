from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from mirror.cli import main


def test_serve_help_lists_options_but_no_secrets() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--config", "--listen", "--upstream", "--cache-dir"):
        assert option in result.output
    assert "--password" not in result.output
    assert "MIRROR_UPSTREAM_PASSWORD" in result.output


def test_bad_listen_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--listen", "nope", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "HOST:PORT" in result.output


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2
    assert "config file not found" in result.output


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert "version" in result.output
