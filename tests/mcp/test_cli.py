"""``hooocus mcp`` argument handling: the sub-command, its flags, and one-line errors (no traceback)."""

from __future__ import annotations

import argparse

import pytest

from hooocus.cli import main
from hooocus_mcp import cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hooocus")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["mcp", *argv])


def test_register_adds_the_mcp_subcommand_and_flags() -> None:
    args = parse("--connect", "ws://127.0.0.1:8188/v1/ws", "--token-env", "MY_TOKEN", "--log-level", "debug")
    assert (args.connect, args.token_env, args.model, args.func) == ("ws://127.0.0.1:8188/v1/ws", "MY_TOKEN", None,
                                                                       cli.run)
    assert parse().token_env == "HOOOCUS_TOKEN"
    assert parse("--model", "demo").model == "demo"


@pytest.mark.parametrize("argv, message", [
    (["--connect", "ws://127.0.0.1:1/v1/ws", "--token-env", "HOOOCUS_TEST_UNSET_TOKEN"],
     "--connect needs a token in $HOOOCUS_TEST_UNSET_TOKEN"),
    (["--connect", "ws://127.0.0.1:1/v1/ws", "--model", "demo"], "--model and --connect exclude each other"),
])
def test_bad_combinations_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("HOOOCUS_TEST_UNSET_TOKEN", raising=False)
    monkeypatch.setenv("HOOOCUS_TOKEN", "t" * 20)
    monkeypatch.chdir(tmp_path)  # no stray hooocus.toml
    assert main(["mcp", *argv, "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr()
    assert message in err.err and "Traceback" not in err.err and err.out == ""


def test_embedded_mode_keeps_images_in_the_data_folder(tmp_path) -> None:
    from engine.core.runtime import create_runtime
    from engine.core.settings import Settings
    from engine.core.testing import FakeRunner

    settings = Settings(data_dir=tmp_path)
    runtime = create_runtime(settings, runner=FakeRunner())  # what `hooocus mcp` (and serve, generate) build
    try:
        assert runtime.images.folder == tmp_path / "images" and runtime.images.folder.is_dir()
        assert runtime.history is not None and runtime.history.db_path.parent == tmp_path
    finally:
        runtime.close()
    memory_only = create_runtime(settings, runner=FakeRunner(), record_history=False)
    assert memory_only.images.folder is None and memory_only.history is None
