"""Settings: defaults < hooocus.toml < HOOOCUS_* env < CLI, with where each value came from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.core.errors import InvalidRequest
from engine.core.settings import Settings, load_settings
from tests.paths import TEST_DATA_VARIABLES


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory (no ./hooocus.toml) and a HOME of our own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_their_sources(home: Path) -> None:
    settings, sources = load_settings(env={"HOME": str(home)})
    assert set(sources) == set(Settings.model_fields)
    assert set(sources.values()) == {"default"}
    assert settings.port == 8188 and settings.host == "127.0.0.1" and settings.tokens is None
    assert settings.data_dir == home / ".local" / "share" / "hooocus"
    assert settings.resolved_output_dir == settings.data_dir / "outputs"
    assert settings.search_dirs("loras")[0] == settings.data_dir / "models" / "loras"


def test_xdg_data_home_moves_the_data_folder(home: Path) -> None:
    settings, _ = load_settings(env={"HOME": str(home), "XDG_DATA_HOME": str(home / "xdg")})
    assert settings.data_dir == home / "xdg" / "hooocus"


def test_precedence_defaults_toml_env_cli(home: Path) -> None:
    toml = write_toml(home / "conf.toml", 'port = 9000\nqueue_size = 5\nlog_level = "warning"\n'
                                          'output_max_bytes = 1000\n')
    env = {"HOME": str(home), "HOOOCUS_PORT": "9100", "HOOOCUS_QUEUE_SIZE": "7"}
    settings, sources = load_settings(cli={"port": 9200, "device": None}, env=env, toml_path=toml)
    assert (settings.port, sources["port"]) == (9200, "cli")  # cli beats env and toml
    assert (settings.queue_size, sources["queue_size"]) == (7, "env:HOOOCUS_QUEUE_SIZE")  # env beats toml
    assert (settings.log_level, sources["log_level"]) == ("warning", f"toml:{toml}")
    assert (settings.output_max_bytes, sources["output_max_bytes"]) == (1000, f"toml:{toml}")
    assert (settings.device, sources["device"]) == ("auto", "default")  # cli None = not given
    assert (settings.host, sources["host"]) == ("127.0.0.1", "default")


def test_toml_hooocus_section_and_discovery(home: Path) -> None:
    write_toml(home / "hooocus.toml", '[hooocus]\nport = 9001\n')
    settings, sources = load_settings(env={"HOME": str(home)})
    assert settings.port == 9001 and sources["port"] == f"toml:{Path('hooocus.toml')}"
    other = write_toml(home / "other.toml", 'port = 9002\n')
    settings, sources = load_settings(env={"HOME": str(home), "HOOOCUS_CONFIG": str(other)})
    assert settings.port == 9002 and sources["port"] == f"toml:{other}"


def test_empty_env_value_counts_as_not_given(home: Path) -> None:
    settings, sources = load_settings(env={"HOME": str(home), "HOOOCUS_PORT": ""})
    assert settings.port == 8188 and sources["port"] == "default"


def test_tuple_env_values_are_split(home: Path) -> None:
    env = {"HOME": str(home),
           "HOOOCUS_CHECKPOINT_DIRS": os.pathsep.join(["/models/a", " /models/b ", "", " "]),
           "HOOOCUS_ALLOWED_ORIGINS": "https://a.example, https://b.example,",
           "HOOOCUS_DEFAULT_STYLES": "Fooocus V2,Fooocus Sharp"}
    settings, sources = load_settings(env=env)
    assert settings.checkpoint_dirs == (Path("/models/a"), Path("/models/b"))
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.default_styles == ("Fooocus V2", "Fooocus Sharp")
    assert sources["checkpoint_dirs"] == "env:HOOOCUS_CHECKPOINT_DIRS"
    assert settings.search_dirs("checkpoints")[1:] == (Path("/models/a"), Path("/models/b"))


def test_secrets_are_masked(home: Path) -> None:
    env = {"HOME": str(home), "HOOOCUS_TOKENS": "alice s3cr3t-token generate", "HOOOCUS_URL_SIGNING_KEY": "k3y"}
    settings, _ = load_settings(env=env)
    assert settings.tokens == "alice s3cr3t-token generate"
    dumped = settings.masked_dump()
    assert dumped["tokens"] == "***" and dumped["url_signing_key"] == "***"
    assert "s3cr3t" not in json.dumps(dumped) and "k3y" not in json.dumps(dumped)


@pytest.mark.parametrize("text, loc", [('colour = "blue"\n', ("colour",)), ('[hooocus]\nprot = 1\n', ("prot",))])
def test_unknown_toml_key_is_invalid_request(home: Path, text: str, loc: tuple[str]) -> None:
    toml = write_toml(home / "bad.toml", text)
    with pytest.raises(InvalidRequest) as err:
        load_settings(env={"HOME": str(home)}, toml_path=toml)
    assert err.value.code == "invalid_request" and err.value.loc == loc and str(toml) in err.value.message


def test_unreadable_toml_unknown_cli_key_and_bad_values_are_invalid_request(home: Path) -> None:
    with pytest.raises(InvalidRequest, match="cannot read config file"):
        load_settings(env={"HOME": str(home)}, toml_path=write_toml(home / "broken.toml", "port = = 1\n"))
    with pytest.raises(InvalidRequest, match="cannot read config file"):
        load_settings(env={"HOME": str(home)}, toml_path=home / "missing.toml")
    with pytest.raises(InvalidRequest, match="unknown setting"):
        load_settings(env={"HOME": str(home)}, cli={"colour": "blue"})
    with pytest.raises(InvalidRequest) as err:
        load_settings(env={"HOME": str(home), "HOOOCUS_PORT": "70000"})
    assert err.value.loc == ("port",)
    with pytest.raises(InvalidRequest):
        load_settings(env={"HOME": str(home)}, cli={"dtype": "float8"})


def test_settings_are_frozen_and_strict() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Settings(unknown=1)  # type: ignore[call-arg]


def test_config_show_prints_values_sources_and_masks_tokens(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from hooocus.cli import main

    for name in [n for n in os.environ if n.startswith("HOOOCUS_") and n not in TEST_DATA_VARIABLES]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HOOOCUS_TOKENS", "alice very-secret-value all")
    monkeypatch.setenv("HOOOCUS_QUEUE_SIZE", "3")
    toml = write_toml(home / "c.toml", "port = 9300\n")
    assert main(["config", "show", "--json", "--config", str(toml), "--data-dir", str(home / "d")]) == 0
    out = capsys.readouterr().out
    assert "very-secret-value" not in out
    shown = json.loads(out)
    assert shown["tokens"] == {"value": "***", "source": "env:HOOOCUS_TOKENS"}
    assert shown["queue_size"] == {"value": 3, "source": "env:HOOOCUS_QUEUE_SIZE"}
    assert shown["port"] == {"value": 9300, "source": f"toml:{toml}"}
    assert shown["data_dir"] == {"value": str(home / "d"), "source": "cli"}
    assert shown["host"]["source"] == "default"
    assert main(["config", "show", "--config", str(toml)]) == 0
    text = capsys.readouterr().out
    assert "very-secret-value" not in text and 'tokens = "***"    # env:HOOOCUS_TOKENS' in text
    assert main(["config", "show", "--config", str(write_toml(home / "bad.toml", "nope = 1\n"))]) == 2
