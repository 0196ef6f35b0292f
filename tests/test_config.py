"""The configuration file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_audit.config import ENV_CONFIG, ENV_OVERRIDES, Config, config_from_env, load_config
from vllm_audit.errors import ConfigError


def test_defaults_are_strict_and_fail_closed() -> None:
    """With no file, durability is strict and failures close."""
    cfg = load_config(None)
    assert ("strict", "fail_closed") == (cfg.log.durability, cfg.log.on_failure)


def test_file_values_are_read(tmp_path: Path) -> None:
    """Values in the file override defaults."""
    p = tmp_path / "c.toml"
    p.write_text('[log]\ndir = "/x"\nbatch_max = 10\n[edge]\ntrusted_proxies = ["10.0.0.0/8"]\n')
    cfg = load_config(p)
    assert ("/x", 10, ("10.0.0.0/8",)) == (cfg.log.dir, cfg.log.batch_max, cfg.edge.trusted_proxies)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[nope]\na = 1\n", "unknown section [nope]"),
        ("[log]\nbogus = 1\n", "unknown key 'bogus'"),
        ('[log]\nbatch_max = "many"\n', "[log] batch_max: expected an integer"),
        ('[log]\non_failure = "maybe"\n', "not one of 'fail_closed', 'fail_open'"),
        ("[log\n", "not valid TOML"),
        ("[log]\ndurable_timeout_s = true\n", "expected a number"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    """Every mistake gives a ConfigError that names file, section and key."""
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert fragment in str(info.value)
    assert str(p) in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A path that does not exist is reported, not raised as OSError."""
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load_config(tmp_path / "absent.toml")


def test_environment_names_the_file_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """VLLM_AUDIT_CONFIG names the file; VLLM_AUDIT_OVERRIDES is merged over it."""
    p = tmp_path / "c.toml"
    p.write_text('[log]\ndir = "/from-file"\nbatch_max = 7\n')
    monkeypatch.setenv(ENV_CONFIG, str(p))
    monkeypatch.setenv(ENV_OVERRIDES, json.dumps({"log": {"dir": "/from-env"}}))
    cfg = config_from_env()
    assert ("/from-env", 7) == (cfg.log.dir, cfg.log.batch_max)


def test_unset_environment_gives_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """No VLLM_AUDIT_CONFIG: the defaults."""
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    monkeypatch.delenv(ENV_OVERRIDES, raising=False)
    assert Config() == config_from_env()
