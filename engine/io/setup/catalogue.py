"""The pinned catalogue of what ``hooocus setup`` installs: every :class:`Asset`, its group and pin.

Groups (``--only`` takes a group or an asset name): the default ones (checkpoint, lora, styles,
wildcards, presets, clip-tokenizer), and the optional ones installed only on request: the Fooocus V2
expansion (CC BY-NC 4.0, never by default), the performance-mode LoRAs, the upscaler and the inpaint
weights, the Image Prompt weights (ip-adapter, controlnet, faceswap), Describe, the Enhance mask models
(``enhance``, ``enhance-sam-vit-l``, ``enhance-sam-vit-h``), and FLUX.1 [schnell] (``flux-schnell``). A
pickle download (``convert="pickle_to_safetensors"``) is converted by
:mod:`engine.io.setup.download` only after its bytes have the pinned sha256.

Data only: nothing here touches the disk or the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from engine.core.errors import InvalidRequest

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
    "upscale_models": "models/upscale_models",
    "inpaint": "models/inpaint",
    "describe": "models/describe",
    "enhance": "models/enhance",
    "text_encoders": "models/text_encoders",
    "vae": "models/vae",
    "flux_tokenizers": "models/flux_tokenizers",
    "controlnet": "models/controlnet",
    "clip_vision": "models/clip_vision",
    "face_detection": "models/face_detection",
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

#: "pickle_to_safetensors": a pickled ``{name: tensor}`` state dict, saved as is.
#: "fooocus_patch_to_safetensors": a pickled ``.fooocus.patch`` ``{ldm key: (w_uint8, min, max)}``, saved as
#: ``<key>::w`` / ``<key>::min`` / ``<key>::max`` (what engine.sdxl.models.inpaint.fooocus_patches_from_state_dict reads).
#: "nested_pickle_to_safetensors": a pickled ``{part: {name: tensor}}`` (the IP-Adapter .bin), saved as ``part.name``.
ConvertKind = Literal["pickle_to_safetensors", "fooocus_patch_to_safetensors", "nested_pickle_to_safetensors"]


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
    #: Set: the download is a pickle that set-up converts into ``dest`` (see :data:`ConvertKind`).
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
UPSCALE_GROUP = "upscale"
INPAINT_GROUP = "inpaint"
#: The inpaint patches of Fooocus's older inpaint engines (v1, v2.5); v2.6 is in INPAINT_GROUP.
INPAINT_OLDER_GROUP = "inpaint-older"
_LICENCE_LLLYASVIEL_WEIGHTS = "lllyasviel's Fooocus weights: see the Hugging Face model page (licence not checked)"
_FOOOCUS_INPAINT_URL = "https://huggingface.co/lllyasviel/fooocus_inpaint/resolve/main/"


def _converted_weight(group: str, url: str, dest_dir: str, dest_name: str, sha256: str | None, size_bytes: int | None,
                      convert: ConvertKind) -> Asset:
    """A pickled weight file that set-up converts to ``dest_dir/dest_name`` (safetensors) after its pin matches."""
    file_name = url.rsplit("/", 1)[-1]
    upstream_dir = dest_dir.split("/", 1)[1]  # models/inpaint -> inpaint (Fooocus and ComfyUI both use it)
    return Asset(name=f"{group}/{dest_name}", group=group, url=url, sha256=sha256, dest=f"{dest_dir}/{dest_name}",
                 size_bytes=size_bytes, licence=_LICENCE_LLLYASVIEL_WEIGHTS,
                 local_paths=(f"models/{upstream_dir}/{file_name}",), convert=convert, optional=True)


#: Weights of the image tasks (issue 14), from the URLs Fooocus 2.5.5 downloads them from on first use
#: (modules/config.py downloading_upscale_model / downloading_inpaint_models). All are pickles: set-up
#: converts them to safetensors only after their sha256 equals the pin; the runner reads only the
#: converted files (engine.imaging.upscaler.UPSCALER_FILE_NAME; the parity README's inpaint file names).
#: Pins (Fooocus pins none; each is the sha256 of the file at lllyasviel/fooocus_inpaint):
#: - fooocus_inpaint_head.pth: 32f7f838...7692, 52 602 bytes, the same in three independent public
#:   manifests (a Nix flake's fetchFromHuggingFace hash, SimpleSDXL's models_info with its size, a
#:   ComfyUI node pack pinned to repo revision 74bbcc07) and a verified-download script;
#: - inpaint_v26.fooocus.patch: f8657a02...0d59, 1 323 362 033 bytes, the same in the same sources (size
#:   from SimpleSDXL's base package list);
#: - inpaint_v25.fooocus.patch 640e4801...febc and inpaint.fooocus.patch ba2a82de...4476: one manifest
#:   each (the node pack pinned to revision 74bbcc07); sizes not published (about 2.58 / 1.32 GB).
#: - fooocus_upscaler_s409985e5.bin: NO published sha256 found (size 33 636 613 bytes, from SimpleSDXL's
#:   manifests). sha256=None: set-up downloads it but refuses to convert (never unpickles it) until the
#:   user checks the sha256 Hugging Face shows for the file and passes ``--trust-sha256``.
UPSCALE_ASSETS: tuple[Asset, ...] = (
    _converted_weight(UPSCALE_GROUP, "https://huggingface.co/lllyasviel/misc/resolve/main/fooocus_upscaler_s409985e5.bin",
                      DATA_LAYOUT["upscale_models"], "fooocus_upscaler_s409985e5.safetensors", None, 33636613,
                      "pickle_to_safetensors"),
)
INPAINT_ASSETS: tuple[Asset, ...] = (
    _converted_weight(INPAINT_GROUP, _FOOOCUS_INPAINT_URL + "fooocus_inpaint_head.pth", DATA_LAYOUT["inpaint"],
                      "fooocus_inpaint_head.safetensors",
                      "32f7f838e0c6d8f13437ba8411e77a4688d77a2e34df8857e4ef4d51f6b97692", 52602, "pickle_to_safetensors"),
    _converted_weight(INPAINT_GROUP, _FOOOCUS_INPAINT_URL + "inpaint_v26.fooocus.patch", DATA_LAYOUT["inpaint"],
                      "inpaint_v26.fooocus.patch.safetensors",
                      "f8657a025104e22d70f9c060635d8e8c2196f433871a2f68dc40abd2171f0d59", 1323362033,
                      "fooocus_patch_to_safetensors"),
    _converted_weight(INPAINT_OLDER_GROUP, _FOOOCUS_INPAINT_URL + "inpaint_v25.fooocus.patch", DATA_LAYOUT["inpaint"],
                      "inpaint_v25.fooocus.patch.safetensors",
                      "640e480158e8a8e0aa673c77d19f8b4095a562ac72e2f2a146b445f78ed0febc", None,
                      "fooocus_patch_to_safetensors"),
    _converted_weight(INPAINT_OLDER_GROUP, _FOOOCUS_INPAINT_URL + "inpaint.fooocus.patch", DATA_LAYOUT["inpaint"],
                      "inpaint.fooocus.patch.safetensors",
                      "ba2a82dec0151105cb593ba7254f58548ec6810aeb9e081c4533fb227d654476", None,
                      "fooocus_patch_to_safetensors"),
)

DESCRIBE_GROUP = "describe"
#: Where engine/describe reads them (engine.describe.blip.BLIP_DIR / engine.describe.tagger.TAGGER_DIR,
#: relative to the models folder; checked by the set-up tests).
DESCRIBE_BLIP_DIR = f"{DATA_LAYOUT['describe']}/blip-image-captioning-base"
DESCRIBE_TAGGER_DIR = f"{DATA_LAYOUT['describe']}/wd-v1-4-moat-tagger-v2"
_BLIP_URL = "https://huggingface.co/Salesforce/blip-image-captioning-base/resolve/main/"
_TAGGER_URL = "https://huggingface.co/SmilingWolf/wd-v1-4-moat-tagger-v2/resolve/main/"
_LICENCE_BLIP = "BLIP (Salesforce), BSD-3-Clause (its Hugging Face model card)"
_LICENCE_WD14 = "WD 1.4 MOAT tagger v2 (SmilingWolf), Apache-2.0 (its Hugging Face model card)"


def _describe_file(folder: str, url: str, file_name: str, licence: str) -> Asset:
    return Asset(name=f"{DESCRIBE_GROUP}/{file_name}", group=DESCRIBE_GROUP, url=url + file_name, sha256=None,
                 dest=f"{folder}/{file_name}", size_bytes=None, licence=licence, optional=True)


#: Describe (spec §12.5, issue 16). Fooocus downloads BLIP as the pickle
#: model_base_caption_capfilt_large.pth and the tagger as lllyasviel/misc wd-v1-4-moat-tagger-v2.onnx/.csv;
#: we take safetensors BLIP weights (transformers' conversion of the same BLIP base capfilt-large caption
#: model) and the tagger from its author's repository (the same model, ONNX: no pickle anywhere, so
#: nothing is converted). Pins: NO published sha256 was found for any of these files (searched public
#: manifests, session 3), so they are unpinned like the upscaler: set-up downloads them, prints the
#: sha256 it got with a warning, and they are never unpickled (safetensors / ONNX / text only).
DESCRIBE_ASSETS: tuple[Asset, ...] = (
    *(_describe_file(DESCRIBE_BLIP_DIR, _BLIP_URL, name, _LICENCE_BLIP)
      for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")),
    *(_describe_file(DESCRIBE_TAGGER_DIR, _TAGGER_URL, name, _LICENCE_WD14)
      for name in ("model.onnx", "selected_tags.csv")),
)

ENHANCE_GROUP = "enhance"
ENHANCE_SAM_LARGE_GROUP = "enhance-sam-vit-l"
ENHANCE_SAM_HUGE_GROUP = "enhance-sam-vit-h"
#: Where engine/masking reads them (engine.masking.service GROUNDING_DINO_DIR, SAM_DIRS, REMBG_DIR,
#: relative to the models folder; checked by the set-up tests).
ENHANCE_DINO_DIR = f"{DATA_LAYOUT['enhance']}/grounding-dino-tiny"
ENHANCE_SAM_DIRS = {"vit_b": f"{DATA_LAYOUT['enhance']}/sam-vit-base", "vit_l": f"{DATA_LAYOUT['enhance']}/sam-vit-large",
                    "vit_h": f"{DATA_LAYOUT['enhance']}/sam-vit-huge"}
ENHANCE_REMBG_DIR = f"{DATA_LAYOUT['enhance']}/rembg"
_DINO_URL = "https://huggingface.co/IDEA-Research/grounding-dino-tiny/resolve/main/"
_SAM_URLS = {"vit_b": "https://huggingface.co/facebook/sam-vit-base/resolve/main/",
             "vit_l": "https://huggingface.co/facebook/sam-vit-large/resolve/main/",
             "vit_h": "https://huggingface.co/facebook/sam-vit-huge/resolve/main/"}
_REMBG_URL = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/"
_LICENCE_DINO = "GroundingDINO (IDEA Research), Apache-2.0 (its Hugging Face model card)"
_LICENCE_SAM = "Segment Anything (Meta AI), Apache-2.0 (its Hugging Face model card)"
_LICENCE_REMBG = ("rembg model release (danielgatis/rembg, MIT); the networks: U-2-Net / DIS / anime-segmentation "
                  "Apache-2.0, cloth-segmentation MIT (their repositories; not checked per file)")
#: rembg model names -> their ONNX file (engine.masking.rembg.REMBG_MODELS).
ENHANCE_REMBG_MODELS = ("u2net", "u2netp", "u2net_human_seg", "u2net_cloth_seg", "silueta", "isnet-general-use",
                        "isnet-anime")


def _enhance_file(group: str, folder: str, url: str, file_name: str, licence: str) -> Asset:
    sub = folder.rsplit("/", 1)[1]
    return Asset(name=f"{group}/{sub}/{file_name}", group=group, url=url + file_name, sha256=None,
                 dest=f"{folder}/{file_name}", size_bytes=None, licence=licence, optional=True)


def _sam_files(group: str, sam_model: str) -> tuple[Asset, ...]:
    return tuple(_enhance_file(group, ENHANCE_SAM_DIRS[sam_model], _SAM_URLS[sam_model], name, _LICENCE_SAM)
                 for name in ("config.json", "model.safetensors", "preprocessor_config.json"))


#: Enhance (spec §12.6, issue 16). Fooocus 2.5.5 downloads GroundingDINO's groundingdino_swint_ogc.pth and
#: SAM's sam_vit_b/l/h pickles, and rembg fetches its ONNX files on first use. We take transformers'
#: safetensors conversions of the same networks (IDEA-Research/grounding-dino-tiny is Swin-T OGC;
#: facebook/sam-vit-base|large|huge) and rembg's own ONNX release files: no pickle anywhere, so nothing is
#: converted. Pins: NO published sha256 was found for these files offline (session 5, no network to read
#: the Hub's LFS pointers), so they are unpinned like the describe models: set-up downloads them and prints
#: the sha256 it got with a warning; they are never unpickled (safetensors / ONNX / JSON / text only).
#: ``enhance``: what the defaults need (GroundingDINO + SAM vit_b) and the rembg models (~1 GB);
#: vit_l (1.2 GB) and vit_h (2.5 GB) are their own groups.
ENHANCE_ASSETS: tuple[Asset, ...] = (
    *(_enhance_file(ENHANCE_GROUP, ENHANCE_DINO_DIR, _DINO_URL, name, _LICENCE_DINO)
      for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json",
                   "tokenizer.json", "special_tokens_map.json", "vocab.txt")),
    *_sam_files(ENHANCE_GROUP, "vit_b"),
    *(_enhance_file(ENHANCE_GROUP, ENHANCE_REMBG_DIR, _REMBG_URL, f"{name}.onnx", _LICENCE_REMBG)
      for name in ENHANCE_REMBG_MODELS),
    *_sam_files(ENHANCE_SAM_LARGE_GROUP, "vit_l"),
    *_sam_files(ENHANCE_SAM_HUGE_GROUP, "vit_h"),
)

FLUX_SCHNELL_GROUP = "flux-schnell"
_LICENCE_FLUX_SCHNELL = "FLUX.1 [schnell] (Black Forest Labs): Apache-2.0"
_LICENCE_T5 = "Google T5 v1.1 / Flan-T5: Apache-2.0"
_FLAN_T5_SMALL = "https://huggingface.co/google/flan-t5-small/resolve/0fc9ddf78a1e988dac52e2dac162b0ede4fd74ab/"


def _flux_file(name: str, url: str, sha256: str | None, dest: str, size_bytes: int | None, licence: str,
               local_paths: tuple[str, ...] = ()) -> Asset:
    return Asset(name=f"{FLUX_SCHNELL_GROUP}/{name}", group=FLUX_SCHNELL_GROUP, url=url, sha256=sha256, dest=dest,
                 size_bytes=size_bytes, licence=licence, local_paths=local_paths, optional=True)


def flux_schnell_paths(data_dir: Path) -> dict[str, Path]:
    """Where the ``flux-schnell`` group installs each part, as ``engine.flux.loading.load_flux`` takes them:
    the transformer file, ``clip_path``, ``t5_path``, ``vae_path`` and ``tokenizer_dir``."""
    return {"transformer": data_dir / DATA_LAYOUT["checkpoints"] / "flux1-schnell.safetensors",
            "clip_path": data_dir / DATA_LAYOUT["text_encoders"] / "clip_l.safetensors",
            "t5_path": data_dir / DATA_LAYOUT["text_encoders"] / "t5xxl_fp16.safetensors",
            "vae_path": data_dir / DATA_LAYOUT["vae"] / "ae.safetensors",
            "tokenizer_dir": data_dir / DATA_LAYOUT["flux_tokenizers"]}


#: FLUX.1 [schnell] (issue 17), Apache-2.0, as single files (the transformer in the Black Forest Labs layout,
#: CLIP-L, T5-XXL in fp16, the VAE) plus tokenizers: ``hooocus setup --only flux-schnell`` (about 34 GB).
#: black-forest-labs/FLUX.1-schnell itself is gated behind a click-through on Hugging Face (an anonymous
#: download gets 401), so the bytes come from ungated copies whose sha256 equals the published one:
#: - flux1-schnell.safetensors 9403429e...2a0a, 23 782 506 688 bytes: the sha256 in the model table of Black
#:   Forest Labs' own flux repository README, and the same file (name, size, sha256) in several independent
#:   manifests, one pinned to Comfy-Org/flux1-schnell, the ungated copy used here;
#: - ae.safetensors afc8e282...9e38, 335 304 388 bytes: several manifests, one stating that BFL's gated file
#:   and the Comfy-Org repackage used here check against this same sha256;
#: - clip_l.safetensors 660c6f5b...6cdd (246 144 152 bytes) and t5xxl_fp16.safetensors 6e480b09...7635
#:   (9 787 841 024 bytes) from comfyanonymous/flux_text_encoders: many manifests agree on both;
#: - the T5 tokenizer (tokenizer.json; no sentencepiece needed) from google/flan-t5-small at a pinned revision,
#:   pins from a manifest of that revision: the same T5 sentencepiece vocabulary as FLUX's tokenizer_2 (the
#:   spiece.model sha256 d60acb12...ea86 is the same for t5-v1_1-xxl and flan-t5); the CLIP tokenizer is the
#:   Fooocus copy of OpenAI's (same pins as the clip-tokenizer group).
#: [dev] is under the FLUX.1 [dev] Non-Commercial License and gated: it is never downloaded here (see the
#: README, "FLUX.1 [dev]", for pointing Hooocus at an existing download).
FLUX_SCHNELL_ASSETS: tuple[Asset, ...] = (
    _flux_file("flux1-schnell.safetensors",
               "https://huggingface.co/Comfy-Org/flux1-schnell/resolve/main/flux1-schnell.safetensors",
               "9403429e0052277ac2a87ad800adece5481eecefd9ed334e1f348723621d2a0a",
               f"{DATA_LAYOUT['checkpoints']}/flux1-schnell.safetensors", 23782506688, _LICENCE_FLUX_SCHNELL,
               ("models/unet/flux1-schnell.safetensors", "models/diffusion_models/flux1-schnell.safetensors",
                "models/checkpoints/flux1-schnell.safetensors")),
    _flux_file("ae.safetensors",
               "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
               "afc8e28272cd15db3919bacdb6918ce9c1ed22e96cb12c4d5ed0fba823529e38",
               f"{DATA_LAYOUT['vae']}/ae.safetensors", 335304388, _LICENCE_FLUX_SCHNELL, ("models/vae/ae.safetensors",)),
    _flux_file("clip_l.safetensors",
               "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
               "660c6f5b1abae9dc498ac2d21e1347d2abdb0cf6c0c0c8576cd796491d9a6cdd",
               f"{DATA_LAYOUT['text_encoders']}/clip_l.safetensors", 246144152, "OpenAI CLIP ViT-L/14: MIT",
               ("models/text_encoders/clip_l.safetensors", "models/clip/clip_l.safetensors")),
    _flux_file("t5xxl_fp16.safetensors",
               "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
               "6e480b09fae049a72d2a8c5fbccb8d3e92febeb233bbe9dfe7256958a9167635",
               f"{DATA_LAYOUT['text_encoders']}/t5xxl_fp16.safetensors", 9787841024, _LICENCE_T5,
               ("models/text_encoders/t5xxl_fp16.safetensors", "models/clip/t5xxl_fp16.safetensors")),
    *(_flux_file(f"tokenizer_2/{name}", _FLAN_T5_SMALL + name, digest,
                 f"{DATA_LAYOUT['flux_tokenizers']}/tokenizer_2/{name}", size, _LICENCE_T5)
      for name, digest, size in (
          ("tokenizer.json", "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a", 2424064),
          ("tokenizer_config.json", "fcde0f79bffda3688119c94330866a8fbf8de20ae65a8c492c9bd47c704655a0", 2539),
          ("special_tokens_map.json", "5c87151ef0f72a99d1f766a4c418bd2a1f90aaa30a8e22fe5eca9641daebb64f", 2201),
      )),
    *(_flux_file(f"tokenizer/{a.dest.rsplit('/', 1)[-1]}", a.url, a.sha256,
                 f"{DATA_LAYOUT['flux_tokenizers']}/tokenizer/{a.dest.rsplit('/', 1)[-1]}", a.size_bytes,
                 a.licence)
      for a in DEFAULT_ASSETS if a.group == "clip-tokenizer"),
)

IP_ADAPTER_GROUP = "ip-adapter"
CONTROLNET_GROUP = "controlnet"
FACESWAP_GROUP = "faceswap"
_FOOOCUS_MISC_URL = "https://huggingface.co/lllyasviel/misc/resolve/main/"


def _misc_file(group: str, file_name: str, dest_dir: str, sha256: str | None, size_bytes: int | None) -> Asset:
    """A safetensors file of lllyasviel/misc that Fooocus downloads on first use, installed as is."""
    upstream_dir = dest_dir.split("/", 1)[1]
    return Asset(name=f"{group}/{file_name}", group=group, url=_FOOOCUS_MISC_URL + file_name, sha256=sha256,
                 dest=f"{dest_dir}/{file_name}", size_bytes=size_bytes, licence=_LICENCE_LLLYASVIEL_WEIGHTS,
                 local_paths=(f"models/{upstream_dir}/{file_name}",), optional=True)


#: Image Prompt weights (issue 16), from the URLs Fooocus 2.5.5 downloads them from on first use
#: (modules/config.py downloading_ip_adapters('ip') / downloading_controlnet_canny / _cpds), into its
#: folders (path_clip_vision, path_controlnet). The runner's file names: engine.sdxl.image_prompt.
#: Pins (Fooocus pins none): sha256 and size from SimpleSDXL's models_info (a Fooocus fork's manifest of
#: these exact lllyasviel/misc files), one source each:
#: - ip-adapter-plus_sdxl_vit-h.bin ec70edb7...de90, 1 013 454 427 bytes (a pickle: converted only after the pin matches);
#: - fooocus_ip_negative.safetensors d7caedfb...a72d, 65 616 bytes;
#: - control-lora-canny-rank128.safetensors 56389dbb...8247, 395 733 680 bytes;
#: - fooocus_xl_cpds_128.safetensors eec3fd82...c2f1, 395 706 528 bytes;
#: - clip_vision_vit_h.safetensors: NO published sha256 found; unpinned (a safetensors file: nothing is
#:   executed on load), size not published (about 1.9 GB).
IMAGE_PROMPT_ASSETS: tuple[Asset, ...] = (
    _misc_file(IP_ADAPTER_GROUP, "clip_vision_vit_h.safetensors", DATA_LAYOUT["clip_vision"], None, None),
    _misc_file(IP_ADAPTER_GROUP, "fooocus_ip_negative.safetensors", DATA_LAYOUT["controlnet"],
               "d7caedfb46780825895718c7c8e9ee077e675c935ddfcf272f1c01a4fc8ea72d", 65616),
    _converted_weight(IP_ADAPTER_GROUP, _FOOOCUS_MISC_URL + "ip-adapter-plus_sdxl_vit-h.bin", DATA_LAYOUT["controlnet"],
                      "ip-adapter-plus_sdxl_vit-h.safetensors",
                      "ec70edb7cc8e769c9388d94eeaea3e4526352c9fae793a608782d1d8951fde90", 1013454427,
                      "nested_pickle_to_safetensors"),
    _misc_file(CONTROLNET_GROUP, "control-lora-canny-rank128.safetensors", DATA_LAYOUT["controlnet"],
               "56389dbb245ca44de91d662529bd4298abc55ce2318f60bc19454fb72ff68247", 395733680),
    _misc_file(CONTROLNET_GROUP, "fooocus_xl_cpds_128.safetensors", DATA_LAYOUT["controlnet"],
               "eec3fd8209a65b41341ea9f415de66909c97b30fb4d20965b3304e8e5251c2f1", 395706528),
)
#: FaceSwap (issue 16; it also needs the ip-adapter group's CLIP vision and negative tokens):
#: - ip-adapter-plus-face_sdxl_vit-h.bin, from the URL Fooocus 2.5.5 downloads it from
#:   (downloading_ip_adapters('face')): sha256 50e886d8...fc36, 1 013 454 761 bytes, from SimpleSDXL's
#:   models_info (the same manifest as the pins above). A pickle: converted only after the pin matches.
#: - YuNet face_detection_yunet_2023mar.onnx (our detector instead of Fooocus's pickled RetinaFace, see
#:   engine/imaging/face_crop.py): opencv_zoo keeps it in git-lfs, and the LFS pointer at
#:   models/face_detection_yunet/ gives sha256 8f2383e4...2fa4 and 232 589 bytes. MIT (that folder's
#:   LICENSE, per its README). An ONNX file: no pickle, installed as is.
FACESWAP_ASSETS: tuple[Asset, ...] = (
    _converted_weight(FACESWAP_GROUP, _FOOOCUS_MISC_URL + "ip-adapter-plus-face_sdxl_vit-h.bin",
                      DATA_LAYOUT["controlnet"], "ip-adapter-plus-face_sdxl_vit-h.safetensors",
                      "50e886d82940b3c5873d80c2b06d8a4b0d0fccec70bc44fd53f16ac3cfd7fc36", 1013454761,
                      "nested_pickle_to_safetensors"),
    Asset(name=f"{FACESWAP_GROUP}/face_detection_yunet_2023mar.onnx", group=FACESWAP_GROUP,
          url="https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/"
              "face_detection_yunet_2023mar.onnx",
          sha256="8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
          dest=f"{DATA_LAYOUT['face_detection']}/face_detection_yunet_2023mar.onnx", size_bytes=232589,
          licence="YuNet (opencv_zoo, from ShiqiYu/libfacedetection.train), MIT", optional=True),
)

OPTIONAL_ASSETS: tuple[Asset, ...] = (*EXPANSION_ASSETS, *PERFORMANCE_LORA_ASSETS, *UPSCALE_ASSETS, *INPAINT_ASSETS,
                                      *IMAGE_PROMPT_ASSETS, *FACESWAP_ASSETS, *DESCRIBE_ASSETS, *ENHANCE_ASSETS,
                                      *FLUX_SCHNELL_ASSETS)
ALL_ASSETS: tuple[Asset, ...] = (*DEFAULT_ASSETS, *OPTIONAL_ASSETS)


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
