"""engine.io.setup against a local HTTP server on 127.0.0.1 (Range support, faults on demand).

Covers: a good download, a checksum mismatch, a broken transfer resumed from the .part (in the
same run and in a later run), a server that ignores Range, offline set-up naming every missing
file, linking from a Fooocus folder, the pinned-pickle conversion, pickles that must never be
opened (a ``__reduce__`` payload that would create a marker file), and the optional
performance-mode LoRAs (installed only on request, where the runner looks for them).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from engine.core.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, AssetsMissing, UnsafeFile
from engine.io.setup import (
    ALL_ASSETS,
    DEFAULT_ASSETS,
    EXPANSION_ASSETS,
    EXPANSION_LICENCE_NOTICE,
    FOOOCUS_COMMIT,
    OPTIONAL_ASSETS,
    PERFORMANCE_LORA_ASSETS,
    PERFORMANCE_LORA_GROUP,
    Asset,
    ChecksumMismatch,
    cli_setup,
    convert_pickle_to_safetensors,
    download_file,
    plan_setup,
    run_setup,
    select_assets,
)


@dataclass
class FakeServer:
    base_url: str
    files: dict[str, bytes] = field(default_factory=dict)
    #: path -> bytes to send before dropping the connection (once).
    cut_after: dict[str, int] = field(default_factory=dict)
    ignore_range: bool = False
    #: (path, Range header or None) for every GET.
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base_url + path


def _handler(server: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            server.requests.append((self.path, self.headers.get("Range")))
            body = server.files.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            range_header = self.headers.get("Range")
            if range_header and not server.ignore_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            cut = server.cut_after.pop(self.path, None)
            if cut is not None:  # promise everything, send a little, hang up
                self.wfile.write(payload[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer(base_url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    httpd.daemon_threads = True
    fake.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    """A local URL where nothing listens (connection refused at once): 'offline'."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _asset(server: FakeServer, name: str, data: bytes, *, dest: str, sha256: str | None = "auto",
           **extra) -> Asset:
    path = f"/files/{name}"
    server.files[path] = data
    return Asset(name=f"test/{name}", group="test", url=server.url(path),
                 sha256=_sha(data) if sha256 == "auto" else sha256, dest=dest, size_bytes=len(data),
                 licence="test", **extra)


BIG = bytes(range(256)) * 4096  # 1 MiB, several chunks


def test_good_download(server: FakeServer, tmp_path: Path) -> None:
    assets = [_asset(server, "model.safetensors", BIG, dest="models/checkpoints/model.safetensors"),
              _asset(server, "styles.json", b'[{"name": "x"}]', dest="sdxl_styles/styles.json")]
    assert [s.state for s in plan_setup(tmp_path, assets=assets)] == ["missing", "missing"]
    final = run_setup(tmp_path, assets=assets, progress=False, echo=lambda _m: None)
    assert [s.state for s in final] == ["present", "present"]
    assert (tmp_path / "models/checkpoints/model.safetensors").read_bytes() == BIG
    assert not list(tmp_path.rglob("*.part"))
    assert all(rng is None for _path, rng in server.requests)
    server.requests.clear()
    run_setup(tmp_path, assets=assets, progress=False, echo=lambda _m: None)  # nothing left to do
    assert server.requests == []


def test_checksum_mismatch_deletes_the_part(server: FakeServer, tmp_path: Path) -> None:
    asset = _asset(server, "model.safetensors", BIG, dest="models/checkpoints/model.safetensors", sha256="0" * 64)
    with pytest.raises(AssetsMissing) as excinfo:
        run_setup(tmp_path, assets=[asset], progress=False, echo=lambda _m: None)
    message = excinfo.value.message
    assert "test/model.safetensors" in message and _sha(BIG) in message and "0" * 64 in message
    assert not (tmp_path / asset.dest).exists() and not list(tmp_path.rglob("*.part"))
    with pytest.raises(ChecksumMismatch):
        download_file(asset.url, tmp_path / "x.bin", sha256="1" * 64, progress=False)
    assert not list(tmp_path.rglob("*.part"))


def test_broken_transfer_resumes_in_the_same_run(server: FakeServer, tmp_path: Path) -> None:
    asset = _asset(server, "model.safetensors", BIG, dest="models/checkpoints/model.safetensors")
    server.cut_after["/files/model.safetensors"] = 300_000
    run_setup(tmp_path, assets=[asset], progress=False, echo=lambda _m: None)
    assert (tmp_path / asset.dest).read_bytes() == BIG
    ranges = [rng for path, rng in server.requests if path == "/files/model.safetensors"]
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1] is not None and int(ranges[1].removeprefix("bytes=").rstrip("-")) > 0


def test_part_from_an_earlier_run_is_resumed(server: FakeServer, tmp_path: Path) -> None:
    asset = _asset(server, "model.safetensors", BIG, dest="models/checkpoints/model.safetensors")
    part = tmp_path / (asset.dest + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(BIG[:123_456])
    status = plan_setup(tmp_path, assets=[asset])[0]
    assert (status.state, status.bytes_present) == ("partial", 123_456)
    run_setup(tmp_path, assets=[asset], progress=False, echo=lambda _m: None)
    assert server.requests == [("/files/model.safetensors", "bytes=123456-")]
    assert (tmp_path / asset.dest).read_bytes() == BIG and not part.exists()


def test_server_that_ignores_range_restarts_cleanly(server: FakeServer, tmp_path: Path) -> None:
    server.ignore_range = True
    asset = _asset(server, "model.safetensors", BIG, dest="m/model.safetensors")
    part = tmp_path / "m/model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BIG[:1000])
    run_setup(tmp_path, assets=[asset], progress=False, echo=lambda _m: None)
    assert (tmp_path / asset.dest).read_bytes() == BIG


def test_offline_names_every_missing_file_and_where_to_put_it(closed_port_url: str, tmp_path: Path) -> None:
    assets = [replace(a, url=closed_port_url + urlsplit(a.url).path) for a in (*DEFAULT_ASSETS, *EXPANSION_ASSETS)
              if a.group in ("styles", "expansion")]
    messages: list[str] = []
    with pytest.raises(AssetsMissing) as excinfo:
        run_setup(tmp_path, assets=assets, progress=False, timeout_s=5, echo=messages.append)
    message = excinfo.value.message
    assert "offline" in message
    for asset in assets:
        assert asset.name in message
        assert str(asset.download_dest(tmp_path)) in message
    assert "downloads/fooocus_expansion.bin" in message  # the pickle goes there; set-up converts it
    assert messages[0] == EXPANSION_LICENCE_NOTICE
    assert len(excinfo.value.details) == len(assets)


def test_offline_names_each_files_own_host(tmp_path: Path) -> None:
    """Styles come from GitHub, the expansion weights from Hugging Face: when neither answers, each
    file's reason names its own host, not the first host that failed."""
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    hosts = {"styles": f"127.0.0.1:{ports[0]}", "expansion": f"127.0.0.1:{ports[1]}"}
    assets = [replace(a, url=f"http://{hosts[a.group]}{urlsplit(a.url).path}")
              for a in (*DEFAULT_ASSETS, *EXPANSION_ASSETS) if a.group in hosts]
    with pytest.raises(AssetsMissing) as excinfo:
        run_setup(tmp_path, assets=assets, progress=False, timeout_s=5, retries=1, echo=lambda _m: None)
    reasons = {d["name"]: d["reason"] for d in excinfo.value.details}
    assert len(reasons) == len(assets)
    for asset in assets:
        own, other = hosts[asset.group], hosts["expansion" if asset.group == "styles" else "styles"]
        assert f"cannot reach {own}" in reasons[asset.name] and other not in reasons[asset.name]
def test_link_from_a_fooocus_folder_instead_of_downloading(server: FakeServer, tmp_path: Path) -> None:
    fooocus = tmp_path / "Fooocus"
    local = fooocus / "models/checkpoints/model.safetensors"
    local.parent.mkdir(parents=True)
    local.write_bytes(BIG)
    asset = _asset(server, "model.safetensors", BIG, dest="models/checkpoints/model.safetensors",
                   local_paths=("models/checkpoints/model.safetensors",))
    data_dir = tmp_path / "data"
    run_setup(data_dir, assets=[asset], link_from=[fooocus], progress=False, echo=lambda _m: None)
    assert server.requests == []
    assert (data_dir / asset.dest).read_bytes() == BIG
    other = tmp_path / "Other"  # a different file under the same name is not used
    (other / "models/checkpoints").mkdir(parents=True)
    (other / "models/checkpoints/model.safetensors").write_bytes(b"not it")
    run_setup(tmp_path / "data2", assets=[asset], link_from=[other], progress=False, echo=lambda _m: None)
    assert server.requests == [("/files/model.safetensors", None)]


# -- pickles -----------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _tensor_pickle() -> tuple[bytes, dict]:
    import io

    import torch

    weight = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    state = {"transformer.wte.weight": weight, "lm_head.weight": weight, "bias": torch.ones(2)}  # tied weights
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), state


def test_pinned_pickle_is_converted_to_safetensors(server: FakeServer, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data, state = _tensor_pickle()
    asset = _asset(server, "fooocus_expansion.bin", data, dest="models/prompt_expansion/model.safetensors",
                   convert="pickle_to_safetensors")
    run_setup(tmp_path, assets=[asset], progress=False, echo=lambda _m: None)
    loaded = load_file(tmp_path / asset.dest)
    assert set(loaded) == set(state) and all((loaded[k] == v).all() for k, v in state.items())
    assert not list((tmp_path / "downloads").iterdir())  # no pickle left behind
    assert plan_setup(tmp_path, assets=[asset])[0].state == "present"
    assert plan_setup(tmp_path, assets=[replace(asset, sha256="f" * 64)])[0].state == "mismatch"


def test_pickle_with_a_wrong_pin_is_never_opened(server: FakeServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    marker = tmp_path / "opened"
    evil = pickle.dumps(_Payload(marker))
    calls: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    asset = _asset(server, "fooocus_expansion.bin", evil, dest="models/prompt_expansion/model.safetensors",
                   sha256=_sha(b"something else"), convert="pickle_to_safetensors")
    with pytest.raises(AssetsMissing, match="does not match the pinned"):
        run_setup(tmp_path, assets=[asset], progress=False, echo=lambda _m: None)
    assert not marker.exists() and calls == []
    assert not (tmp_path / asset.dest).exists() and not list(tmp_path.rglob("*.part"))
    # Placed by hand with the wrong content: refused unopened as well.
    placed = asset.download_dest(tmp_path)
    placed.write_bytes(evil)
    with pytest.raises(UnsafeFile, match="not the pinned"):
        convert_pickle_to_safetensors(placed, tmp_path / "out.safetensors", expected_sha256=asset.sha256)
    with pytest.raises(UnsafeFile, match="without a pinned sha256"):
        convert_pickle_to_safetensors(placed, tmp_path / "out.safetensors", expected_sha256=None)
    assert not marker.exists() and calls == []


def test_pinned_pickle_with_code_is_still_refused(tmp_path: Path) -> None:
    """Even when the pin matches, weights_only=True rejects anything that is not tensors."""
    marker = tmp_path / "opened"
    source = tmp_path / "evil.bin"
    source.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    with pytest.raises(UnsafeFile, match="not a plain tensor state dict"):
        convert_pickle_to_safetensors(source, tmp_path / "out.safetensors", expected_sha256=_sha(source.read_bytes()))
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


# -- the real asset table and the command line -----------------------------------------------------------


def test_default_assets_are_pinned_fooocus_files(fooocus_data: Path) -> None:
    """Data-file pins equal the unchanged copies in tests/data/fooocus-data; every pickle is pinned."""
    CORE_AND_EXPANSION = (*DEFAULT_ASSETS, *EXPANSION_ASSETS)  # the expansion is optional but pinned too
    names = [a.name for a in CORE_AND_EXPANSION]
    assert len(names) == len(set(names)) and len({a.dest for a in CORE_AND_EXPANSION}) == len(CORE_AND_EXPANSION)
    shared = {"sdxl_styles": "sdxl_styles", "wildcards": "wildcards", "presets": "presets",
              "models/prompt_expansion/fooocus_expansion": "gpt2_tokenizer", "ldm_patched/modules/sd1_tokenizer":
              "clip_tokenizer"}
    checked = 0
    for asset in CORE_AND_EXPANSION:
        assert asset.sha256 is not None and len(asset.sha256) == 64
        if asset.url.startswith("https://raw.githubusercontent.com/"):
            assert f"/lllyasviel/Fooocus/{FOOOCUS_COMMIT}/" in asset.url
            upstream = asset.local_paths[0]
            folder, file_name = upstream.rsplit("/", 1)
            copy = fooocus_data / ("prompt_expansion" if file_name == "positive.txt" else shared[folder]) / file_name
            if file_name == "positive.txt" and not copy.is_file():
                continue  # CC BY-NC 4.0: only in a Fooocus data folder outside the repo ($HOOOCUS_FOOOCUS_DATA)
            assert _sha(copy.read_bytes()) == asset.sha256 and copy.stat().st_size == asset.size_bytes
            checked += 1
    assert checked == len([p for p in fooocus_data.rglob("*") if p.is_file() and p.name != "README.md"])
    pickles = [a for a in CORE_AND_EXPANSION if a.convert]
    assert [a.name for a in pickles] == ["expansion/model.safetensors"] and pickles[0].url.endswith(".bin")


def test_cli_installs_the_real_data_files_from_a_mirror(server: FakeServer, fooocus_data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    for asset in DEFAULT_ASSETS:
        if asset.group in ("styles", "wildcards", "presets"):
            folder, file_name = asset.local_paths[0].rsplit("/", 1)
            server.files[f"/lllyasviel/Fooocus/{FOOOCUS_COMMIT}/{folder}/{file_name}"] = \
                (fooocus_data / folder / file_name).read_bytes()
    args = ["--data-dir", str(tmp_path), "--yes", "--no-progress", "--mirror", server.base_url,
            "--only", "styles", "--only", "wildcards", "--only", "presets"]
    assert cli_setup(args) == 0
    assert (tmp_path / "sdxl_styles/sdxl_styles_fooocus.json").read_bytes() == \
        (fooocus_data / "sdxl_styles/sdxl_styles_fooocus.json").read_bytes()
    assert len(list((tmp_path / "presets").iterdir())) == 8
    assert "set-up complete" in capsys.readouterr().out
    assert cli_setup([*args, "--list"]) == 0 and "everything is in place" in capsys.readouterr().out


def test_cli_offline_and_usage(closed_port_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_setup(["--data-dir", str(tmp_path), "--yes", "--no-progress", "--mirror", closed_port_url,
                      "--only", "expansion"])
    captured = capsys.readouterr()
    assert code == EXIT_FAILED
    assert "CC BY-NC 4.0" in captured.out and "expansion/positive.txt" in captured.err
    assert cli_setup(["--data-dir", str(tmp_path), "--only", "nonsense"]) == EXIT_USAGE
    assert "unknown asset or group" in capsys.readouterr().err
    assert cli_setup(["--data-dir", str(tmp_path), "--only", "presets"]) == EXIT_USAGE  # no --yes, no terminal
    assert "--yes" in capsys.readouterr().err


# -- optional: the performance-mode LoRAs ------------------------------------------------------------


def test_performance_loras_are_optional_pinned_and_match_the_modes() -> None:
    from engine.sdxl.modes import PERFORMANCE_MODES

    wanted = sorted(mode.lora_file for mode in PERFORMANCE_MODES.values() if mode.lora_file)
    assert sorted(Path(a.dest).name for a in PERFORMANCE_LORA_ASSETS) == wanted and len(wanted) == 3
    for asset in PERFORMANCE_LORA_ASSETS:
        assert asset.optional and asset.group == PERFORMANCE_LORA_GROUP and asset.convert is None
        assert asset.dest == f"models/loras/{Path(asset.dest).name}" and asset.url.endswith("/" + Path(asset.dest).name)
        assert asset.url.startswith("https://huggingface.co/") and asset.size_bytes and asset.size_bytes > 100 << 20
        assert asset.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", asset.sha256)
    assert not any(a.optional for a in DEFAULT_ASSETS)
    assert ALL_ASSETS == (*DEFAULT_ASSETS, *OPTIONAL_ASSETS)
    assert len({a.name for a in ALL_ASSETS}) == len({a.dest for a in ALL_ASSETS}) == len(ALL_ASSETS)


def test_optional_assets_are_selected_only_on_request() -> None:
    assert select_assets(ALL_ASSETS, None) == list(DEFAULT_ASSETS)
    assert select_assets(ALL_ASSETS, None, include_optional=True) == list(ALL_ASSETS)
    assert select_assets(ALL_ASSETS, [PERFORMANCE_LORA_GROUP]) == list(PERFORMANCE_LORA_ASSETS)
    # the non-commercial expansion is never part of the default selection (spec §0)
    assert select_assets(ALL_ASSETS, ["expansion"]) == list(EXPANSION_ASSETS) and EXPANSION_ASSETS
    assert all(a.optional and a.group == "expansion" for a in EXPANSION_ASSETS)
    one = PERFORMANCE_LORA_ASSETS[1]
    assert select_assets(ALL_ASSETS, [one.name]) == [one]
    assert [s.asset for s in plan_setup(Path("/nonexistent"))] == list(DEFAULT_ASSETS)


def test_cli_lists_optional_groups_and_installs_them_only_when_asked(server: FakeServer, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    names = [a.name for a in PERFORMANCE_LORA_ASSETS]
    assert cli_setup(["--data-dir", str(tmp_path), "--list"]) == 0
    out = capsys.readouterr().out
    assert not any(name in out for name in names)
    # groups are listed sorted: "controlnet" (issue 16) now comes before "expansion"
    assert re.search(rf"optional, not selected: (\S+, )*expansion, .*{PERFORMANCE_LORA_GROUP}", out)
    for flags in (["--only", PERFORMANCE_LORA_GROUP], ["--all"]):
        assert cli_setup(["--data-dir", str(tmp_path), "--list", *flags]) == 0
        out = capsys.readouterr().out
        assert all(re.search(rf"missing\s+{re.escape(name)}", out) for name in names)
        assert not re.search(rf"optional, not selected:.*{PERFORMANCE_LORA_GROUP}", out)
    # Served by a mirror with test bytes (their pins swapped for the test bytes' sha256): the files
    # land where the runner's LoRA search finds them.
    import numpy as np
    from safetensors.numpy import save_file

    from engine.core.settings import Settings
    from engine.io.registry import ModelRegistry
    from engine.io.setup import catalogue

    stand_ins = []
    for asset in PERFORMANCE_LORA_ASSETS:
        source = tmp_path / "src" / Path(asset.dest).name
        source.parent.mkdir(exist_ok=True)
        save_file({"lora_unet.x.lora_down.weight": np.ones((2, 2), dtype=np.float16)}, str(source))
        data = source.read_bytes()
        server.files[urlsplit(asset.url).path] = data
        stand_ins.append(replace(asset, sha256=_sha(data), size_bytes=len(data)))
    monkeypatch.setattr(catalogue, "OPTIONAL_ASSETS", (*EXPANSION_ASSETS, *stand_ins))
    monkeypatch.setattr(catalogue, "ALL_ASSETS", (*DEFAULT_ASSETS, *EXPANSION_ASSETS, *stand_ins))
    data_dir = tmp_path / "data"
    assert cli_setup(["--data-dir", str(data_dir), "--yes", "--no-progress", "--mirror", server.base_url,
                      "--only", PERFORMANCE_LORA_GROUP]) == 0
    assert "set-up complete" in capsys.readouterr().out
    installed = ModelRegistry.from_settings(Settings(data_dir=data_dir)).names("loras")
    assert sorted(installed) == sorted(Path(a.dest).name for a in PERFORMANCE_LORA_ASSETS)


# -- issue 14: the upscale and inpaint groups ------------------------------------------------------------


def test_upscale_and_inpaint_groups_install_where_the_runtime_reads() -> None:
    import ast

    import engine.imaging
    from engine.io.setup import INPAINT_ASSETS, INPAINT_GROUP, UPSCALE_ASSETS, UPSCALE_GROUP

    # The upscaler's own constants, read from its source rather than imported: importing it pulls in
    # torch and spandrel, which this set-up test does not need.
    source = Path(engine.imaging.__file__).with_name("upscaler.py").read_text(encoding="utf-8")
    constants = {node.targets[0].id: node.value.value for node in ast.parse(source).body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                 and isinstance(node.value, ast.Constant)}
    UPSCALE_MODELS_DIR, UPSCALER_FILE_NAME = constants["UPSCALE_MODELS_DIR"], constants["UPSCALER_FILE_NAME"]

    (upscaler,) = select_assets(ALL_ASSETS, [UPSCALE_GROUP])
    assert upscaler in UPSCALE_ASSETS and upscaler.optional
    assert upscaler.dest == f"models/{UPSCALE_MODELS_DIR}/{UPSCALER_FILE_NAME}"
    assert upscaler.url.endswith("/lllyasviel/misc/resolve/main/fooocus_upscaler_s409985e5.bin")
    inpaint = select_assets(ALL_ASSETS, [INPAINT_GROUP])
    assert [Path(a.dest).name for a in inpaint] == ["fooocus_inpaint_head.safetensors",
                                                   "inpaint_v26.fooocus.patch.safetensors"]
    assert all(a in INPAINT_ASSETS and a.optional and a.sha256 for a in inpaint)
    assert [a.convert for a in inpaint] == ["pickle_to_safetensors", "fooocus_patch_to_safetensors"]
    # Every weight download is a pickle converted to safetensors; none is installed by default.
    assert all(a.convert and a.dest.endswith(".safetensors") for a in (*UPSCALE_ASSETS, *INPAINT_ASSETS))
    assert not set(UPSCALE_ASSETS + INPAINT_ASSETS) & set(select_assets(ALL_ASSETS, None))


def _patch_pickle() -> tuple[bytes, dict]:
    import io

    import torch

    generator = torch.Generator().manual_seed(0)
    patch = {
        "diffusion_model.input_blocks.0.0.weight": (
            torch.randint(0, 256, (4, 2, 3, 3), dtype=torch.uint8, generator=generator),
            torch.rand(4, 1, 1, 1, generator=generator).half(), torch.rand(4, 1, 1, 1, generator=generator).half()),
        "diffusion_model.middle_block.1.proj_in.weight": (
            torch.randint(0, 256, (4, 4), dtype=torch.uint8, generator=generator),
            torch.rand(4, 1, generator=generator).half(), torch.rand(4, 1, generator=generator).half()),
    }
    buffer = io.BytesIO()
    torch.save(patch, buffer)
    return buffer.getvalue(), patch


def test_fooocus_patch_is_converted_to_what_the_inpaint_loader_reads(server: FakeServer, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from engine.sdxl.models.inpaint import fooocus_patches_from_state_dict

    data, patch = _patch_pickle()
    asset = _asset(server, "inpaint_v26.fooocus.patch", data, dest="models/inpaint/inpaint_v26.fooocus.patch.safetensors",
                   convert="fooocus_patch_to_safetensors")
    run_setup(tmp_path, assets=[asset], progress=False, echo=lambda _m: None)
    loaded = fooocus_patches_from_state_dict(load_file(tmp_path / asset.dest))
    assert set(loaded) == set(patch)
    for key, (w, low, high) in patch.items():
        assert (loaded[key].w_uint8 == w).all() and (loaded[key].w_min == low).all() and (loaded[key].w_max == high).all()
    assert plan_setup(tmp_path, assets=[asset])[0].state == "present"


def test_fooocus_patch_conversion_refuses_a_plain_state_dict(tmp_path: Path) -> None:
    from engine.core.errors import ModelInvalid

    data, _ = _tensor_pickle()
    source = tmp_path / "not_a_patch.bin"
    source.write_bytes(data)
    with pytest.raises(ModelInvalid, match="not a \\(w, min, max\\) tensor triple"):
        convert_pickle_to_safetensors(source, tmp_path / "out.safetensors", expected_sha256=_sha(data),
                                      kind="fooocus_patch_to_safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def _unpinned_upscaler(server: FakeServer, data: bytes) -> Asset:
    from engine.io.setup import UPSCALE_ASSETS

    (upscaler,) = UPSCALE_ASSETS
    server.files[urlsplit(upscaler.url).path] = data
    return replace(upscaler, size_bytes=len(data))  # sha256 stays None, as in the catalogue


def test_unpinned_pickle_is_downloaded_but_never_opened(server: FakeServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from engine.io.setup import catalogue

    marker = tmp_path / "opened"
    evil = pickle.dumps(_Payload(marker))
    asset = _unpinned_upscaler(server, evil)
    assert asset.sha256 is None
    monkeypatch.setattr(catalogue, "ALL_ASSETS", (*DEFAULT_ASSETS, asset))
    data_dir = tmp_path / "data"
    args = ["--data-dir", str(data_dir), "--yes", "--no-progress", "--mirror", server.base_url, "--only", "upscale"]
    assert cli_setup(args) == EXIT_FAILED
    err = capsys.readouterr().err
    assert not marker.exists() and not (data_dir / asset.dest).exists()
    kept = asset.download_dest(data_dir)
    assert kept.read_bytes() == evil  # kept for the user to check
    assert f"--trust-sha256 {asset.name}={_sha(evil)}" in err and "did not open it" in err


def test_trusted_sha256_converts_only_the_exact_bytes(server: FakeServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    from engine.io.setup import catalogue

    data, state = _tensor_pickle()
    asset = _unpinned_upscaler(server, data)
    monkeypatch.setattr(catalogue, "ALL_ASSETS", (*DEFAULT_ASSETS, asset))
    data_dir = tmp_path / "data"
    args = ["--data-dir", str(data_dir), "--yes", "--no-progress", "--mirror", server.base_url, "--only", "upscale"]
    # A pin the bytes do not have: the download is deleted, nothing converted.
    assert cli_setup([*args, "--trust-sha256", "0" * 64]) == EXIT_FAILED
    assert "does not match the pinned" in capsys.readouterr().err and not (data_dir / asset.dest).exists()
    # Bad flags are usage errors and install nothing.
    assert cli_setup([*args, "--trust-sha256", "xyz"]) == EXIT_USAGE
    assert cli_setup([*args, "--trust-sha256", f"{DEFAULT_ASSETS[0].name}={'0' * 64}"]) == EXIT_USAGE
    capsys.readouterr()
    # The checked pin (NAME= may be left out with one unpinned asset): converted, pickle removed.
    assert cli_setup([*args, "--trust-sha256", _sha(data).upper()]) == EXIT_OK
    loaded = load_file(data_dir / asset.dest)
    assert set(loaded) == set(state) and not list((data_dir / "downloads").iterdir())


# -- issue 16: the describe group ------------------------------------------------------------------------


def test_describe_group_installs_what_the_describer_loads(tmp_path: Path, server: FakeServer,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``hooocus setup --only describe`` puts BLIP and the tagger where engine/describe reads them
    (tiny stand-ins served by a mirror); they are unpinned, so set-up warns with the sha256 it got."""
    import json

    from engine.core.settings import Settings
    from engine.describe.blip import BLIP_DIR, BLIP_FILES
    from engine.describe.service import Describer
    from engine.describe.tagger import TAGGER_DIR, TAGGER_MODEL_FILE, TAGGER_TAGS_FILE
    from engine.io.setup import DESCRIBE_ASSETS, DESCRIBE_GROUP
    from tests.describe_models import install_tiny_describe_models
    from tests.images import data_uri, solid_png

    assets = select_assets(ALL_ASSETS, [DESCRIBE_GROUP])
    assert assets == list(DESCRIBE_ASSETS) and all(a.optional and a.convert is None for a in assets)
    assert not set(assets) & set(select_assets(ALL_ASSETS, None))  # never by default
    # Only safetensors, ONNX and text: nothing to unpickle, so unpinned is allowed (download only).
    assert {Path(a.dest).suffix for a in assets} <= {".safetensors", ".onnx", ".json", ".txt", ".csv"}
    dests = {a.dest for a in assets}
    assert {f"models/{BLIP_DIR}/{name}" for name in BLIP_FILES} <= dests
    assert {f"models/{TAGGER_DIR}/{name}" for name in (TAGGER_MODEL_FILE, TAGGER_TAGS_FILE)} <= dests

    source = install_tiny_describe_models(tmp_path / "src")
    special = source / BLIP_DIR / "special_tokens_map.json"
    if not special.exists():  # transformers 5 no longer writes it; the Hub repository has one
        special.write_text(json.dumps({"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                                       "unk_token": "[UNK]", "mask_token": "[MASK]"}))
    for asset in assets:
        server.files[urlsplit(asset.url).path] = (source / asset.dest.split("/", 1)[1]).read_bytes()
    data_dir = tmp_path / "data"
    assert cli_setup(["--data-dir", str(data_dir), "--yes", "--no-progress", "--mirror", server.base_url,
                      "--only", DESCRIBE_GROUP]) == EXIT_OK
    out = capsys.readouterr().out
    assert all(f"warning: {a.name} has no pinned sha256" in out for a in assets)
    describer = Describer(Settings(data_dir=data_dir, device="cpu"))
    try:
        result = describer.describe({"image": data_uri(solid_png(16, 16, (0, 0, 255))), "mode": "both"})
    finally:
        describer.close()
    assert result.prompt.endswith("hatsune miku, smile, ribbon \\(hair\\), blue theme")


def test_faceswap_group_installs_what_the_runner_reads(tmp_path: Path, server: FakeServer) -> None:
    """``--only faceswap`` (issue 16): the face IP-Adapter's nested pickle, converted only after its pin
    matches, and the YuNet ONNX as it is, land where engine.sdxl.image_prompt reads them. Tiny stand-ins
    are served with their own pins (the real pins are for the real bytes)."""
    import io

    import torch
    from safetensors.torch import load_file

    from engine.imaging.face_crop import YuNetDetector
    from engine.io.setup.catalogue import FACESWAP_ASSETS, FACESWAP_GROUP
    from engine.sdxl.image_prompt import FACE_ADAPTER_FILE, FACE_DETECTOR_FILE
    from tests.face_models import build_tiny_yunet, cell_landmarks, face_picture

    assert select_assets(ALL_ASSETS, [FACESWAP_GROUP]) == list(FACESWAP_ASSETS)
    assert all(a.optional and a.sha256 and len(a.sha256) == 64 for a in FACESWAP_ASSETS)
    assert {a.dest for a in FACESWAP_ASSETS} == {f"models/{FACE_ADAPTER_FILE}", f"models/{FACE_DETECTOR_FILE}"}
    state = {"image_proj": {"latents": torch.arange(8.0).reshape(1, 2, 4)},
             "ip_adapter": {"1.to_k_ip.weight": torch.ones(4, 4), "1.to_v_ip.weight": torch.zeros(4, 4)}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    served = {"ip-adapter-plus-face_sdxl_vit-h.bin": buffer.getvalue(),
              "face_detection_yunet_2023mar.onnx": build_tiny_yunet().SerializeToString()}
    assets = []
    for asset in FACESWAP_ASSETS:
        name = urlsplit(asset.url).path.rsplit("/", 1)[-1]
        data = served[name]
        server.files[f"/files/{name}"] = data
        assets.append(replace(asset, url=server.url(f"/files/{name}"), sha256=_sha(data), size_bytes=len(data)))
    run_setup(tmp_path, assets=assets, progress=False, echo=lambda _m: None)
    adapter = load_file(tmp_path / "models" / FACE_ADAPTER_FILE)
    assert set(adapter) == {"image_proj.latents", "ip_adapter.1.to_k_ip.weight", "ip_adapter.1.to_v_ip.weight"}
    assert torch.equal(adapter["image_proj.latents"], state["image_proj"]["latents"])
    (face,) = YuNetDetector(tmp_path / "models" / FACE_DETECTOR_FILE).detect(face_picture(64, 96, cell=(0, 2)))
    assert np.abs(face.landmarks - cell_landmarks(0, 2)).max() < 1e-3  # float32 bound, as in test_face_crop


# -- issue 16: the enhance groups -------------------------------------------------------------------------


def test_enhance_group_installs_what_the_mask_models_load(tmp_path: Path, server: FakeServer,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``hooocus setup --only enhance`` puts GroundingDINO, SAM vit_b and the rembg models where
    engine/masking reads them (tiny stand-ins served by a mirror), and a mask is then made from them."""
    import numpy as np

    from engine.core.request import EnhanceTab
    from engine.io.setup import ENHANCE_ASSETS, ENHANCE_GROUP
    from engine.masking.service import GROUNDING_DINO_DIR, REMBG_DIR, SAM_DIRS, MaskGenerator, check_mask_files
    from tests.enhance_models import write_tiny_grounding_dino, write_tiny_rembg, write_tiny_sam

    assets = select_assets(ALL_ASSETS, [ENHANCE_GROUP])
    assert assets and all(a.optional and a.convert is None and a.group == ENHANCE_GROUP for a in assets)
    assert set(select_assets(ALL_ASSETS, ["enhance-sam-vit-l", "enhance-sam-vit-h"])) == set(ENHANCE_ASSETS) - set(assets)
    assert not set(ENHANCE_ASSETS) & set(select_assets(ALL_ASSETS, None))  # never by default
    assert {Path(a.dest).suffix for a in ENHANCE_ASSETS} <= {".safetensors", ".onnx", ".json", ".txt"}
    dests = {a.dest for a in assets}
    for folder in (GROUNDING_DINO_DIR, SAM_DIRS["vit_b"]):
        assert {f"models/{folder}/config.json", f"models/{folder}/model.safetensors"} <= dests
    assert {Path(d).name for d in dests if d.startswith(f"models/{REMBG_DIR}/")} == {
        "u2net.onnx", "u2netp.onnx", "u2net_human_seg.onnx", "u2net_cloth_seg.onnx", "silueta.onnx",
        "isnet-general-use.onnx", "isnet-anime.onnx"}

    source = tmp_path / "src"
    write_tiny_grounding_dino(source / GROUNDING_DINO_DIR)
    write_tiny_sam(source / SAM_DIRS["vit_b"])
    special = source / GROUNDING_DINO_DIR / "special_tokens_map.json"
    if not special.exists():  # transformers 5 no longer writes it; the Hub repository has one
        special.write_text("{}")
    for asset in assets:
        if asset.dest.endswith(".onnx"):
            write_tiny_rembg(source / asset.dest.split("/", 1)[1])
        server.files[urlsplit(asset.url).path] = (source / asset.dest.split("/", 1)[1]).read_bytes()
    data_dir = tmp_path / "data"
    assert cli_setup(["--data-dir", str(data_dir), "--yes", "--no-progress", "--mirror", server.base_url,
                      "--only", ENHANCE_GROUP]) == EXIT_OK
    out = capsys.readouterr().out
    assert all(f"warning: {a.name} has no pinned sha256" in out for a in assets)
    tabs = [EnhanceTab(detection_prompt="face", box_threshold=0.0), EnhanceTab(mask_model="isnet-anime")]
    check_mask_files(data_dir / "models", tabs)
    found = MaskGenerator(data_dir / "models", "cpu").make(np.zeros((16, 16, 3), np.uint8), tabs[0])
    assert found.boxes_found == 4
