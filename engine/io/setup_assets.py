"""``hooocus setup``: fetch the files Fooocus's default preset uses, pinned and checksummed.

What it installs under the data folder (see :data:`DATA_LAYOUT`):

- the default SDXL checkpoint and the offset LoRA that Fooocus's ``presets/default.json`` names
  (spec §14), from the URLs in that preset;
- Fooocus's style, wildcard and preset files, from the pinned Fooocus commit;
- the Fooocus V2 expansion: GPT-2 config and tokenizer files, positive.txt, and the weights. The
  weights are published only as a pickle (``fooocus_expansion.bin``). Set-up converts them to
  ``model.safetensors`` and unpickles them only after their sha256 equals the pinned value, with
  ``torch.load(weights_only=True)`` on the bytes it hashed. An unpinned pickle is never opened;
- the CLIP tokenizer files single-file checkpoints need;
- optionally (``--only performance-loras`` or ``--all``, never by default): the LoRAs of the fast
  performance modes (Extreme Speed, Lightning, Hyper-SD), which Fooocus downloads on first use
  (spec §9), from the same URLs.

Every transfer has timeouts, resumes from a ``*.part`` file with an HTTP Range request, shows a
tqdm bar, and is checked against its pinned sha256 before it is renamed into place (a mismatch
deletes the part). Offline, set-up names every missing file, its URL and where to put it by hand.
Files already in a Fooocus / ComfyUI / A1111 install can be linked instead of downloaded.

Nothing here runs at import; httpx, tqdm and torch are imported when used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from engine.core.errors import AssetsMissing, HooocusError, InvalidRequest, ModelInvalid, UnsafeFile
from engine.core.formats import file_sha256

__all__ = [
    "ALL_ASSETS", "Asset", "EXPANSION_ASSETS", "PERFORMANCE_LORA_ASSETS", "AssetStatus", "DATA_LAYOUT", "DEFAULT_ASSETS", "EXPANSION_LICENCE_NOTICE",
    "FOOOCUS_COMMIT", "OPTIONAL_ASSETS", "PERFORMANCE_LORA_GROUP", "add_arguments", "cli_setup",
    "convert_pickle_to_safetensors", "download_file", "plan_setup", "run_setup", "select_assets",
]

FOOOCUS_COMMIT = "59f183ab9b8e4a4bbf0fb8bc43886e19e8dfdfae"  # Fooocus 2.5.5, the spec's reference
_FOOOCUS_RAW = f"https://raw.githubusercontent.com/lllyasviel/Fooocus/{FOOOCUS_COMMIT}/"

#: Where each kind of file lives, relative to the data folder (Fooocus's folder names).
DATA_LAYOUT: dict[str, str] = {
    "checkpoints": "models/checkpoints",
    "loras": "models/loras",
    "expansion": "models/prompt_expansion",
    "clip_tokenizer": "models/clip_tokenizer",
    "styles": "sdxl_styles",
    "wildcards": "wildcards",
    "presets": "presets",
    "downloads": "downloads",
}

EXPANSION_LICENCE_NOTICE = """\
NOTICE - Fooocus V2 prompt expansion (non-commercial licence)
  The expansion weights (fooocus_expansion.bin), its word list positive.txt and the expansion
  algorithm are by Lvmin Zhang (Fooocus). Outside Fooocus they may be used for NON-COMMERCIAL
  purposes only: CC BY-NC 4.0, https://creativecommons.org/licenses/by-nc/4.0/
  Hooocus is not Fooocus. Do not use the 'Fooocus V2' style in a commercial product; leave the
  expansion out with --only (see --list) or delete models/prompt_expansion."""

_LICENCE_NC = "CC BY-NC 4.0: non-commercial use only outside Fooocus (spec §0.1)"
_LICENCE_FOOOCUS_DATA = "Fooocus repository data, GPL-3.0 (fooocus-data/README.md)"
_LICENCE_OPENAI_TOKENIZER = "OpenAI tokenizer files, MIT"

ConvertKind = Literal["pickle_to_safetensors"]


@dataclass(frozen=True)
class Asset:
    """One file set-up installs. ``dest`` is relative to the data folder."""

    #: "<group>/<file>", unique; ``--only`` takes a name or a group.
    name: str
    group: str
    url: str
    #: Pinned sha256 of the bytes at ``url``; None = unpinned (never allowed for a pickle).
    sha256: str | None
    dest: str
    size_bytes: int | None
    licence: str
    #: Where a Fooocus / ComfyUI / A1111 install keeps the same file, relative to its root.
    local_paths: tuple[str, ...] = ()
    #: "pickle_to_safetensors": the download is a pickle that set-up converts into ``dest``.
    convert: ConvertKind | None = None
    #: Installed only when asked for by name or group (``--only``) or with ``--all``.
    optional: bool = False

    def download_dest(self, data_dir: Path) -> Path:
        """Where the bytes from ``url`` land: ``dest``, or downloads/<file> for a conversion."""
        if self.convert is None:
            return data_dir / self.dest
        return data_dir / DATA_LAYOUT["downloads"] / Path(urlsplit(self.url).path).name


def _fooocus_file(group: str, upstream: str, dest_dir: str, sha256: str, size_bytes: int,
                  licence: str = _LICENCE_FOOOCUS_DATA) -> Asset:
    """A file of the Fooocus repository at the pinned commit (pins: the unchanged copies in
    /work/shared/fooocus-data, see its README)."""
    file_name = upstream.rsplit("/", 1)[-1]
    return Asset(name=f"{group}/{file_name}", group=group, url=_FOOOCUS_RAW + upstream, sha256=sha256,
                 dest=f"{dest_dir}/{file_name}", size_bytes=size_bytes, licence=licence, local_paths=(upstream,))


_EXPANSION_UPSTREAM = "models/prompt_expansion/fooocus_expansion"
_CLIP_TOKENIZER_UPSTREAM = "ldm_patched/modules/sd1_tokenizer"

DEFAULT_ASSETS: tuple[Asset, ...] = (
    # presets/default.json checkpoint_downloads. Pin: sha256 aeb7e9e6...2867, 7 105 348 592 bytes, as
    # listed in two public model manifests (SimpleSDXL models_info) and matching CivitAI's AutoV2
    # "AEB7E9E689" and the "Model hash: aeb7e9e689" Fooocus 2.5.5 writes for this file.
    Asset(name="checkpoint/juggernautXL_v8Rundiffusion.safetensors", group="checkpoint",
          url="https://huggingface.co/lllyasviel/fav_models/resolve/main/fav/juggernautXL_v8Rundiffusion.safetensors",
          sha256="aeb7e9e6897a1e58b10494bd989d001e3d4bc9b634633cd7b559838f612c2867",
          dest=f"{DATA_LAYOUT['checkpoints']}/juggernautXL_v8Rundiffusion.safetensors", size_bytes=7105348592,
          licence="Juggernaut XL v8 (KandooAI / RunDiffusion): its own licence, see its model page (not checked)",
          local_paths=("models/checkpoints/juggernautXL_v8Rundiffusion.safetensors",
                       "models/Stable-diffusion/juggernautXL_v8Rundiffusion.safetensors")),
    # presets/default.json lora_downloads. Pin: sha256 48526861...cdf6f, 49 553 604 bytes, the same in
    # several independent public manifests pinned to stabilityai/stable-diffusion-xl-base-1.0.
    Asset(name="lora/sd_xl_offset_example-lora_1.0.safetensors", group="lora",
          url="https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
              "sd_xl_offset_example-lora_1.0.safetensors",
          sha256="4852686128f953d0277d0793e2f0335352f96a919c9c16a09787d77f55cbdf6f",
          dest=f"{DATA_LAYOUT['loras']}/sd_xl_offset_example-lora_1.0.safetensors", size_bytes=49553604,
          licence="Stability AI SDXL 1.0, CreativeML Open RAIL++-M",
          local_paths=("models/loras/sd_xl_offset_example-lora_1.0.safetensors",
                       "models/Lora/sd_xl_offset_example-lora_1.0.safetensors")),
    # spec §2.5: Fooocus downloads lllyasviel/misc fooocus_expansion.bin as pytorch_model.bin. Pin:
    # the git-lfs pointer of that file in a public mirror (oid sha256:dd54cc90..., size 351283802; an
    # LFS oid is the sha256 of the content), its size confirmed by an independent Fooocus manifest.
    Asset(name="expansion/model.safetensors", group="expansion",
          url="https://huggingface.co/lllyasviel/misc/resolve/main/fooocus_expansion.bin",
          sha256="dd54cc90d95d2c72b97830e4b38f44a6521847284d5b9dbcfd16ba82779cdeb3",
          dest=f"{DATA_LAYOUT['expansion']}/model.safetensors", size_bytes=351283802, licence=_LICENCE_NC,
          local_paths=(f"{_EXPANSION_UPSTREAM}/pytorch_model.bin",), convert="pickle_to_safetensors"),
    _fooocus_file("expansion", f"{_EXPANSION_UPSTREAM}/positive.txt", DATA_LAYOUT["expansion"],
                  "ac571555cce32ad1b693d9405a0c613be13a79aba798a96455060cd8b53b910e", 5655, _LICENCE_NC),
    _fooocus_file("expansion", f"{_EXPANSION_UPSTREAM}/config.json", DATA_LAYOUT["expansion"],
                  "55a78bf7ce753eafb57a7d0b3a8f9680fa6d2530535d32b6296a0735a6922fb3", 937, _LICENCE_OPENAI_TOKENIZER),
    _fooocus_file("expansion", f"{_EXPANSION_UPSTREAM}/merges.txt", DATA_LAYOUT["expansion"],
                  "fe36cab26d4f4421ed725e10a2e9ddb7f799449c603a96e7f29b5a3c82a95862", 456356,
                  _LICENCE_OPENAI_TOKENIZER),
    _fooocus_file("expansion", f"{_EXPANSION_UPSTREAM}/special_tokens_map.json", DATA_LAYOUT["expansion"],
                  "6f50ab5a5a509a1c309d6171f339b196a900dc9c99ad0408ff23bb615fdae7ad", 99, _LICENCE_OPENAI_TOKENIZER),
    _fooocus_file("expansion", f"{_EXPANSION_UPSTREAM}/tokenizer.json", DATA_LAYOUT["expansion"],
                  "86f12f9648802a0c45c4b87ef2ab235e9bfdf1a43cc40571291507c81e35c4c3", 2107625,
                  _LICENCE_OPENAI_TOKENIZER),
    _fooocus_file("expansion", f"{_EXPANSION_UPSTREAM}/tokenizer_config.json", DATA_LAYOUT["expansion"],
                  "0f7123cb7e1be4e9c2e8770bd3c00f73d75364fb71680d0412d6263e7af2654c", 255, _LICENCE_OPENAI_TOKENIZER),
    _fooocus_file("expansion", f"{_EXPANSION_UPSTREAM}/vocab.json", DATA_LAYOUT["expansion"],
                  "3ba3c3109ff33976c4bd966589c11ee14fcaa1f4c9e5e154c2ed7f99d80709e7", 798156,
                  _LICENCE_OPENAI_TOKENIZER),
    _fooocus_file("clip-tokenizer", f"{_CLIP_TOKENIZER_UPSTREAM}/merges.txt", DATA_LAYOUT["clip_tokenizer"],
                  "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a", 524619,
                  _LICENCE_OPENAI_TOKENIZER),
    _fooocus_file("clip-tokenizer", f"{_CLIP_TOKENIZER_UPSTREAM}/special_tokens_map.json",
                  DATA_LAYOUT["clip_tokenizer"],
                  "c4864a9376a8401918425bed71fc14fc0e81f9b59ec45c1cf96cccb2df508eac", 472, _LICENCE_OPENAI_TOKENIZER),
    _fooocus_file("clip-tokenizer", f"{_CLIP_TOKENIZER_UPSTREAM}/tokenizer_config.json",
                  DATA_LAYOUT["clip_tokenizer"],
                  "00439066fcba73de57644cf41e4e3b9f2dbb09d7f3fc2005898ba52399045882", 806, _LICENCE_OPENAI_TOKENIZER),
    _fooocus_file("clip-tokenizer", f"{_CLIP_TOKENIZER_UPSTREAM}/vocab.json", DATA_LAYOUT["clip_tokenizer"],
                  "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349", 1059962,
                  _LICENCE_OPENAI_TOKENIZER),
    *(_fooocus_file("styles", f"sdxl_styles/{name}", DATA_LAYOUT["styles"], digest, size,
                    _LICENCE_FOOOCUS_DATA + "; styles by SAI, twri, 3Diva, Marc K3nt3L, MRE")
      for name, digest, size in (
          ("sdxl_styles_fooocus.json", "1251fd16ac0862e99a6ecb1969e10cef13af43b9a1ddd715013cd6d7c856e0f9", 4569),
          ("sdxl_styles_sai.json", "a70cfade8c71bc697a188a5f7f9eed531c2ac7446fcb6044114dbabaef5103fb", 4962),
          ("sdxl_styles_mre.json", "150db608f01912ea68a8f6f2c1f946dd1f123c68eb7ece61965dda978385210e", 6658),
          ("sdxl_styles_twri.json", "3296a6a0b0572924e792dd330b374e12900f18deae05bf9158b9295ec2a96761", 24290),
          ("sdxl_styles_diva.json", "6a0d06f876628c85f7aec07e1aeb841dd2b34e4aff0e6eda61ec74e96fab5150", 18395),
          ("sdxl_styles_marc_k3nt3l.json", "8381c538d3ed15b99d4bfab5229c73466cab92cd5a458264f91098fe2f72fcdd",
           22078),
      )),
    *(_fooocus_file("wildcards", f"wildcards/{name}", DATA_LAYOUT["wildcards"], digest, size)
      for name, digest, size in (
          ("animal.txt", "b4bf166348d1c7a664cc0f10629eb10934ad671628c26105d33916437339efcd", 738),
          ("artist.txt", "2da2473e91eb793812c105cd9790d556cce74c1742ef2661361d6927f5bb987e", 41560),
          ("color.txt", "2a08fa7a5a9565b72957bd803fd8b50f4fc481bdfd5d850e654635e3643b936f", 101),
          ("color_flower.txt", "0fb5a52ab26005d09bc7367d9c2ea667207235d0b1374c3deaa37b645502741f", 21),
          ("extended-color.txt", "ca22363a1bf7371c440090b93a35444598bb30b8b6f9b93ba24c88e7ec450ebf", 1456),
          ("flower.txt", "0bc68a034fcde3a0731eda03d8a0bb7e3f9e17d894e9e2d7fc1464c3837519aa", 3159),
          ("nationality.txt", "28575de8b134dd68ea999153f06f7162e6d22b215158cb5514e814c3b40389d1", 1888),
      )),
    *(_fooocus_file("presets", f"presets/{name}", DATA_LAYOUT["presets"], digest, size)
      for name, digest, size in (
          ("default.json", "9648554cd7960b35871a5c3ac883e61e772ed2da8aae4e60e6623a2b488fa92a", 1734),
          ("anime.json", "620cffa79c5423d107eb69c986554997885ff84fab1077e618bd289c297f3364", 1523),
          ("lcm.json", "788179fc73bf078331d201caf79022e717992795ae98993d7f73ab254bc8c636", 1526),
          ("lightning.json", "780b2287098a973fc8bbff7526130bc46a1c97a05e2f4d6d7f27be6dd09d51c2", 1488),
          ("playground_v2.5.json", "a936589d078de2e119b4de7002aedd354ad3d0ba60767ccbe5d1b13e7824471a", 1268),
          ("pony_v6.json", "9318a6b36dc143e38eeab7ea60a9abc1326858f4a72463e907162f13bf4a8592", 1396),
          ("realistic.json", "1912f489e0e8ca2a2774f91ece83c993b6a4959956d1d349836f28d13cc5ddf9", 1616),
          ("sai.json", "94102101a5de335ffe14803b621a59501e79b607ca2c0c01a134f8c3b22d7732", 1632),
      )),
)
# The Fooocus V2 expansion (weights, word list, tokenizer) is CC-BY-NC 4.0 outside Fooocus (spec §0):
# never installed by default, only with --only expansion or --all, and set-up prints the notice then.
EXPANSION_ASSETS: tuple[Asset, ...] = tuple(replace(a, optional=True) for a in DEFAULT_ASSETS if a.group == "expansion")
DEFAULT_ASSETS = tuple(a for a in DEFAULT_ASSETS if a.group != "expansion")

PERFORMANCE_LORA_GROUP = "performance-loras"


def _performance_lora(file_name: str, url: str, sha256: str, size_bytes: int, licence: str) -> Asset:
    return Asset(name=f"{PERFORMANCE_LORA_GROUP}/{file_name}", group=PERFORMANCE_LORA_GROUP, url=url, sha256=sha256,
                 dest=f"{DATA_LAYOUT['loras']}/{file_name}", size_bytes=size_bytes, licence=licence,
                 local_paths=(f"models/loras/{file_name}", f"models/Lora/{file_name}"), optional=True)


#: The LoRAs of the fast performance modes (spec §9), from the URLs Fooocus 2.5.5 downloads them
#: from on first use of the mode (modules/config.py downloading_sdxl_*_lora): LCM from
#: lllyasviel/misc, Lightning and Hyper-SD from mashb1t/misc (spec §0.3). Pins, from public manifests:
#: - Lightning: sha256 bf56cf26...6b79, 393 854 592 bytes. Listed for this file name in SimpleSDXL's
#:   models_info (a Fooocus fork), and the same sha256 is the pinned hash of the upstream
#:   ByteDance/SDXL-Lightning sdxl_lightning_4step_lora.safetensors in refiners' conversion table and
#:   the git-lfs oid in a Hugging Face CDN URL of that file: mashb1t's copy is the upstream file.
#: - Hyper-SD: sha256 12f81a27...d76e, 787 359 648 bytes, in SimpleSDXL's models_info, and the same
#:   sha256 is the 4-step Hyper-SDXL LoRA in an independent model database (MIR).
#: - LCM: sha256 c3dbf7eb...1329, 393 854 624 bytes, in SimpleSDXL's models_info (several versions of
#:   it); the size matches what other tools list for the SDXL LCM LoRA. Only one project's manifest
#:   gives the sha256 (lllyasviel's file is not latent-consistency's pytorch_lora_weights, a764e685...).
#: The same manifest lists our default checkpoint and offset LoRA with the pins above.
PERFORMANCE_LORA_ASSETS: tuple[Asset, ...] = (
    _performance_lora("sdxl_lcm_lora.safetensors",
                      "https://huggingface.co/lllyasviel/misc/resolve/main/sdxl_lcm_lora.safetensors",
                      "c3dbf7eb26dd00ae6b6b95da69be9f1cb95a3b2c5bcf9be82323227a19b91329", 393854624,
                      "SDXL LCM LoRA (latent-consistency): its own licence, see its model page (not checked)"),
    _performance_lora("sdxl_lightning_4step_lora.safetensors",
                      "https://huggingface.co/mashb1t/misc/resolve/main/sdxl_lightning_4step_lora.safetensors",
                      "bf56cf2657efb15e465d81402ed481d1e11c4677e4bcce1bc11fe71ad8506b79", 393854592,
                      "SDXL-Lightning (ByteDance): its own licence, see its model page (not checked)"),
    _performance_lora("sdxl_hyper_sd_4step_lora.safetensors",
                      "https://huggingface.co/mashb1t/misc/resolve/main/sdxl_hyper_sd_4step_lora.safetensors",
                      "12f81a27d00a751a40d68fd15597091896c5a90f3bd632fb6c475607cbdad76e", 787359648,
                      "Hyper-SD (ByteDance): its own licence, see its model page (not checked)"),
)

#: Everything set-up knows; without ``--only``/``--all`` it installs the non-optional ones (DEFAULT_ASSETS).
OPTIONAL_ASSETS: tuple[Asset, ...] = (*EXPANSION_ASSETS, *PERFORMANCE_LORA_ASSETS)
ALL_ASSETS: tuple[Asset, ...] = (*DEFAULT_ASSETS, *OPTIONAL_ASSETS)

#: Files up to this size are re-hashed whenever the plan looks at them; bigger ones only with --verify.
_ALWAYS_HASH_BYTES = 64 << 20
_CHUNK_BYTES = 1 << 20

State = Literal["present", "missing", "partial", "mismatch"]


@dataclass(frozen=True)
class AssetStatus:
    asset: Asset
    path: Path
    state: State
    #: Bytes already in the ``.part`` file (state "partial").
    bytes_present: int = 0
    detail: str = ""


class ChecksumMismatch(ModelInvalid):
    """Downloaded bytes do not have the pinned sha256 (the part file has been deleted)."""


class _Unreachable(Exception):
    """The server could not be reached at all (no connection)."""


def select_assets(assets: Iterable[Asset], only: Sequence[str] | None, *,
                  include_optional: bool = False) -> list[Asset]:
    """The assets named by ``only`` (asset names or groups, optional ones included); when ``only``
    is empty, every non-optional asset (and the optional ones too with ``include_optional``)."""
    assets = list(assets)
    if not only:
        return [a for a in assets if include_optional or not a.optional]
    known = {a.name for a in assets} | {a.group for a in assets}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise InvalidRequest(f"unknown asset or group {', '.join(map(repr, unknown))}; "
                             f"groups: {', '.join(sorted({a.group for a in assets}))}")
    return [a for a in assets if a.name in only or a.group in only]


def _choose(assets: Iterable[Asset] | None, only: Sequence[str] | None) -> list[Asset]:
    """``assets`` as given (filtered by ``only``), or the default selection from ALL_ASSETS."""
    if assets is None:
        return select_assets(ALL_ASSETS, only)
    return select_assets(assets, only, include_optional=True)


def _converted_source_sha256(path: Path) -> str | None:
    """The ``source_sha256`` recorded in a safetensors header (read without torch)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 << 20:
                return None
            header = json.loads(handle.read(length))
        return header.get("__metadata__", {}).get("source_sha256")
    except (OSError, ValueError, struct.error, AttributeError):
        return None


def _status(asset: Asset, data_dir: Path, *, verify: bool) -> AssetStatus:
    path = data_dir / asset.dest
    if path.is_file():
        if asset.convert is not None:
            if _converted_source_sha256(path) == asset.sha256:
                return AssetStatus(asset, path, "present")
            return AssetStatus(asset, path, "mismatch", detail="not converted from the pinned file")
        size = path.stat().st_size
        if asset.size_bytes is not None and size != asset.size_bytes:
            return AssetStatus(asset, path, "mismatch", detail=f"{size} bytes, expected {asset.size_bytes}")
        if asset.sha256 is not None and (verify or size <= _ALWAYS_HASH_BYTES):
            digest = file_sha256(path)
            if digest != asset.sha256:
                return AssetStatus(asset, path, "mismatch", detail=f"sha256 {digest}, pinned {asset.sha256}")
        return AssetStatus(asset, path, "present")
    download = asset.download_dest(data_dir)
    part = download.with_name(download.name + ".part")
    if part.is_file():
        return AssetStatus(asset, path, "partial", bytes_present=part.stat().st_size)
    return AssetStatus(asset, path, "missing")


def plan_setup(data_dir: Path, *, assets: Iterable[Asset] | None = None, only: Sequence[str] | None = None,
               verify: bool = False) -> list[AssetStatus]:
    """What is present, partly downloaded, missing or different from its pin under ``data_dir``."""
    chosen = _choose(assets, only)
    return [_status(a, Path(data_dir), verify=verify) for a in chosen]


# -- transfer ----------------------------------------------------------------------------------------


def _http_client(timeout_s: float) -> Any:
    """One client for a whole set-up run: redirects followed (Hugging Face -> CDN), every phase timed out."""
    import httpx

    return httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 15.0)), follow_redirects=True,
                        headers={"User-Agent": "hooocus-setup"})


def _transfer_once(client: Any, url: str, part: Path, *, size_bytes: int | None, desc: str, progress: bool) -> None:
    """One GET into ``part``, continuing it with a Range request when it already has bytes."""
    import httpx
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    if size_bytes is not None and offset >= size_bytes:
        if offset == size_bytes:
            return  # complete already; the checksum decides
        part.unlink()
        offset = 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 416 and offset:  # our part is not a prefix of theirs
                part.unlink()
                raise httpx.ReadError("range not satisfiable; starting again")
            if response.status_code not in (200, 206):
                raise HooocusError(f"HTTP {response.status_code} for {url}", code="assets_missing")
            if response.status_code == 206 and not response.headers.get("content-range", "").startswith(
                    f"bytes {offset}-"):
                part.unlink(missing_ok=True)
                raise httpx.ReadError("unexpected Content-Range; starting again")
            if response.status_code == 200:
                offset = 0  # the server ignored the Range header and sends the whole file
            length = response.headers.get("content-length")
            total = size_bytes or (offset + int(length) if length and length.isdigit() else None)
            with open(part, "ab" if offset else "wb") as handle, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                    disable=not progress, leave=False, file=sys.stderr) as bar:
                for chunk in response.iter_bytes():  # as it arrives: a broken transfer keeps its bytes
                    handle.write(chunk)
                    bar.update(len(chunk))
                    offset += len(chunk)
                    if size_bytes is not None and offset > size_bytes:
                        break  # more than the pinned file: the checksum will fail
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _Unreachable(str(exc) or type(exc).__name__) from None


def download_file(url: str, dest: Path, *, sha256: str | None, size_bytes: int | None = None,
                  client: Any = None, timeout_s: float = 30.0, retries: int = 3, progress: bool = True,
                  desc: str | None = None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming it; verify; rename into place.

    A broken transfer is resumed up to ``retries`` times in this call (the part file stays for a
    later run). A sha256 other than the pinned one deletes the part and raises ChecksumMismatch.
    """
    import httpx

    own_client = client is None
    if own_client:
        client = _http_client(timeout_s)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        for attempt in range(retries + 1):
            try:
                _transfer_once(client, url, part, size_bytes=size_bytes, desc=desc or dest.name, progress=progress)
                break
            except httpx.TransportError as exc:  # read error, timeout, peer closed mid-body
                if attempt == retries:
                    raise HooocusError(f"download of {url} interrupted ({exc or type(exc).__name__}); "
                                       f"run set-up again to resume from {part}", code="assets_missing") from None
    finally:
        if own_client:
            client.close()
    digest = file_sha256(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise ChecksumMismatch(f"{dest.name}: sha256 {digest} does not match the pinned {sha256}; "
                               "the download was deleted")
    if dest.is_symlink():
        dest.unlink()
    os.replace(part, dest)
    return dest


# -- the pickle conversion -----------------------------------------------------------------------------


def convert_pickle_to_safetensors(source: Path, dest: Path, *, expected_sha256: str | None) -> Path:
    """Convert a pickled tensor state dict to safetensors, only if its sha256 is the pinned one.

    The bytes are read once, hashed, and unpickled from memory with ``weights_only=True`` (tensors
    and plain containers only), so the file that was checked is the file that is read. An unpinned
    or mismatching file is never unpickled. Tied tensors are copied (safetensors stores no aliases).
    """
    if expected_sha256 is None:
        raise UnsafeFile(f"{source.name} is a pickle without a pinned sha256; refusing to open it")
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise UnsafeFile(f"{source.name}: sha256 {digest} is not the pinned {expected_sha256}; not opened")
    import io

    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler refused something that is not a tensor
        raise UnsafeFile(f"{source.name} is not a plain tensor state dict: {exc}") from None
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise ModelInvalid(f"{source.name} does not hold a state dict of named tensors")
    tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": source.name, "source_sha256": digest})
    os.replace(tmp, dest)
    return dest


# -- set-up -------------------------------------------------------------------------------------------


def _find_local(asset: Asset, roots: Sequence[Path]) -> Path | None:
    for root in roots:
        for relative in asset.local_paths:
            candidate = Path(root) / relative
            if candidate.is_file():
                return candidate
    return None


def _link(source: Path, dest: Path) -> None:
    """Symlink ``dest`` -> ``source`` (no copy of a 7 GB file); copy where links are not allowed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    try:
        os.symlink(source.resolve(), dest)
    except OSError:
        shutil.copy2(source, dest)


def _manual_hint(asset: Asset, data_dir: Path) -> str:
    where = asset.download_dest(data_dir)
    pin = f" (sha256 {asset.sha256})" if asset.sha256 else ""
    then = "; set-up converts it on the next run" if asset.convert else ""
    return f"  {asset.name}\n      from {asset.url}\n      put it at {where}{pin}{then}"


def run_setup(data_dir: Path, *, assets: Iterable[Asset] | None = None, only: Sequence[str] | None = None,
              link_from: Sequence[Path] = (), timeout_s: float = 30.0, retries: int = 3, progress: bool = True,
              verify: bool = False, echo: Callable[[str], None] | None = None) -> list[AssetStatus]:
    """Install every selected asset that is not present yet; return the final statuses.

    Order per asset: a copy in one of ``link_from`` (verified, then linked or converted), a file
    placed by hand in downloads/ (for the pickle), else a download. Raises ``AssetsMissing`` at
    the end, naming every asset still missing, why, its URL and where to put it by hand.
    """
    echo = echo or (lambda message: print(message, file=sys.stderr))
    data_dir = Path(data_dir)
    chosen = _choose(assets, only)
    plan = plan_setup(data_dir, assets=chosen, verify=verify)
    todo = [s for s in plan if s.state != "present"]
    if any(s.asset.licence == _LICENCE_NC for s in todo):
        echo(EXPANSION_LICENCE_NOTICE)
    problems: dict[str, str] = {}
    #: host -> why it could not be reached; each host is tried once, and the message names the
    #: host that actually failed (files come from GitHub and Hugging Face, not one place).
    unreachable: dict[str, str] = {}
    client = _http_client(timeout_s)
    try:
        for status in todo:
            asset = status.asset
            if status.state == "mismatch":
                problems[asset.name] = (f"{status.path} exists but differs from the pinned file ({status.detail}); "
                                        "move it away to download the pinned one")
                continue
            try:
                source = _local_source(asset, data_dir, link_from, echo)
                if source is None:
                    host = urlsplit(asset.url).netloc
                    if host in unreachable:
                        problems[asset.name] = f"not downloaded: {unreachable[host]}"
                        continue
                    need = (asset.size_bytes or 0) - status.bytes_present
                    target = asset.download_dest(data_dir)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if need > shutil.disk_usage(target.parent).free:
                        problems[asset.name] = f"not enough free disk space in {target.parent} ({need} bytes needed)"
                        continue
                    echo(f"downloading {asset.name} ({_human(asset.size_bytes)})")
                    source = download_file(asset.url, target, sha256=asset.sha256, size_bytes=asset.size_bytes,
                                           client=client, retries=retries, progress=progress, desc=asset.name)
                    if asset.sha256 is None:
                        echo(f"warning: {asset.name} has no pinned sha256; got {file_sha256(source)}")
                if asset.convert == "pickle_to_safetensors":
                    echo(f"converting {source.name} to {asset.dest}")
                    convert_pickle_to_safetensors(source, data_dir / asset.dest, expected_sha256=asset.sha256)
                    if source.parent == data_dir / DATA_LAYOUT["downloads"]:
                        source.unlink()  # keep no pickle around once its tensors are safe
            except _Unreachable as exc:
                host = urlsplit(asset.url).netloc
                unreachable[host] = f"cannot reach {host} ({exc}); offline?"
                problems[asset.name] = f"not downloaded: {unreachable[host]}"
            except HooocusError as exc:
                problems[asset.name] = exc.message
    finally:
        client.close()
    final = plan_setup(data_dir, assets=chosen)
    missing = [s for s in final if s.state != "present"]
    if missing:
        lines = [f"{len(missing)} of {len(final)} set-up files are missing or wrong:"]
        for s in missing:
            lines.append(_manual_hint(s.asset, data_dir))
            if s.asset.name in problems:
                lines.append(f"      why: {problems[s.asset.name]}")
        raise AssetsMissing("\n".join(lines), details=[
            {"name": s.asset.name, "url": s.asset.url, "dest": str(s.asset.download_dest(data_dir)),
             "sha256": s.asset.sha256, "reason": problems.get(s.asset.name, s.state)} for s in missing])
    return final


def _local_source(asset: Asset, data_dir: Path, roots: Sequence[Path], echo: Callable[[str], None]) -> Path | None:
    """A verified local copy to use instead of downloading: linked into place (normal files) or
    returned for conversion (the pickle). None when there is none."""
    if asset.convert is not None:
        placed = asset.download_dest(data_dir)
        if placed.is_file():  # put there by hand, or a complete earlier download
            return placed
    found = _find_local(asset, roots)
    if found is None:
        return None
    if asset.sha256 is not None and file_sha256(found) != asset.sha256:
        echo(f"{found} differs from the pinned {asset.name}; downloading instead")
        return None
    if asset.convert is not None:
        return found
    _link(found, data_dir / asset.dest)
    echo(f"linked {asset.dest} -> {found}")
    return data_dir / asset.dest


def _human(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "size unknown"
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size_bytes} B"  # pragma: no cover


# -- command line -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hooocus setup`` flags (``--data-dir`` comes from the common flags)."""
    groups = ", ".join(sorted({a.group for a in DEFAULT_ASSETS}))
    optional = ", ".join(sorted({a.group for a in OPTIONAL_ASSETS}))
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"an asset or group ({groups}; optional: {optional}); repeat")
    parser.add_argument("--all", action="store_true", help=f"also install the optional groups ({optional})")
    parser.add_argument("--fooocus-dir", action="append", type=Path, default=[], metavar="PATH",
                        help="link files from an existing Fooocus (or ComfyUI / A1111) folder instead of downloading")
    parser.add_argument("--yes", action="store_true", help="download without asking")
    parser.add_argument("--list", action="store_true", help="show what is present and missing; download nothing")
    parser.add_argument("--verify", action="store_true", help="re-hash large files that are already present")
    parser.add_argument("--mirror", metavar="URL", help="fetch every file from this base URL instead (same paths)")
    parser.add_argument("--no-progress", action="store_true")


def _with_mirror(asset: Asset, base: str) -> Asset:
    mirror, original = urlsplit(base), urlsplit(asset.url)
    path = mirror.path.rstrip("/") + original.path
    return replace(asset, url=urlunsplit((mirror.scheme, mirror.netloc, path, original.query, "")))


def cli_setup(args: argparse.Namespace | Sequence[str], settings: Any = None) -> int:
    """``hooocus setup``: print the plan, confirm, install. Returns the exit code (0 ok, 1 failed,
    2 usage / not confirmed). Errors are one message, never a traceback."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="hooocus setup")
        parser.add_argument("--data-dir", type=Path)
        add_arguments(parser)
        args = parser.parse_args(list(args))
    if settings is not None:
        data_dir = Path(settings.data_dir)
    else:
        from engine.core.settings import default_data_dir

        data_dir = Path(getattr(args, "data_dir", None) or default_data_dir())
    try:
        assets = select_assets(ALL_ASSETS, args.only, include_optional=args.all)
    except HooocusError as exc:
        print(f"hooocus setup: {exc.message}", file=sys.stderr)
        return 2
    if args.mirror:
        assets = [_with_mirror(a, args.mirror) for a in assets]
    plan = plan_setup(data_dir, assets=assets, verify=args.verify)
    print(f"data folder: {data_dir}")
    for status in plan:
        extra = f" ({status.bytes_present} bytes so far)" if status.state == "partial" else ""
        print(f"  {status.state:<8} {status.asset.name:<55} {_human(status.asset.size_bytes):>10}{extra}")
    todo = [s for s in plan if s.state != "present"]
    chosen = {a.name for a in assets}
    left_out = sorted({a.group for a in ALL_ASSETS if a.optional and a.name not in chosen})
    if left_out:
        print(f"  optional, not selected: {', '.join(left_out)} (add --only GROUP or --all)")
    if args.list or not todo:
        print("everything is in place" if not todo else f"{len(todo)} files to install")
        return 0
    total = sum((s.asset.size_bytes or 0) - s.bytes_present for s in todo)
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"hooocus setup: {len(todo)} files ({_human(total)}) to install; re-run with --yes", file=sys.stderr)
            return 2
        if input(f"Install {len(todo)} files ({_human(total)}) into {data_dir}? [y/N] ").strip().lower() not in (
                "y", "yes"):
            return 2
    try:
        run_setup(data_dir, assets=assets, link_from=args.fooocus_dir, progress=not args.no_progress,
                  verify=args.verify, echo=print)
    except HooocusError as exc:
        print(f"hooocus setup: {exc.message}", file=sys.stderr)
        return 1
    print("set-up complete")
    for root in args.fooocus_dir:
        print(f"to use every model in {root}, add to hooocus.toml:\n"
              f"  checkpoint_dirs = [\"{Path(root) / 'models' / 'checkpoints'}\"]\n"
              f"  lora_dirs = [\"{Path(root) / 'models' / 'loras'}\"]")
    return 0
