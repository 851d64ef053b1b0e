"""``hooocus setup``: fetch the files Fooocus's default preset uses, pinned and checksummed.

- :mod:`.catalogue`: what is installed (every pinned :class:`Asset`, its group, where it goes);
- :mod:`.download`: resumable pinned downloads, sha256 checks, pickle -> safetensors after the pin matches;
- :mod:`.install`: the plan (what is present) and the set-up run (link, place by hand, download, convert);
- :mod:`.command`: the ``hooocus setup`` command line, returning EXIT_* codes.

Importing this package imports only those modules (no httpx, tqdm or torch until used).
"""

from engine.io.setup.catalogue import (
    ALL_ASSETS,
    DATA_LAYOUT,
    DEFAULT_ASSETS,
    DESCRIBE_ASSETS,
    DESCRIBE_GROUP,
    ENHANCE_ASSETS,
    ENHANCE_GROUP,
    EXPANSION_ASSETS,
    EXPANSION_LICENCE_NOTICE,
    FLUX_SCHNELL_ASSETS,
    FLUX_SCHNELL_GROUP,
    FOOOCUS_COMMIT,
    INPAINT_ASSETS,
    INPAINT_GROUP,
    OPTIONAL_ASSETS,
    PERFORMANCE_LORA_ASSETS,
    PERFORMANCE_LORA_GROUP,
    UPSCALE_ASSETS,
    UPSCALE_GROUP,
    Asset,
    flux_schnell_paths,
    select_assets,
)
from engine.io.setup.command import add_arguments, cli_setup, trust_pins
from engine.io.setup.download import ChecksumMismatch, convert_pickle_to_safetensors, download_file
from engine.io.setup.install import AssetStatus, plan_setup, run_setup

__all__ = [
    "ALL_ASSETS", "Asset", "AssetStatus", "ChecksumMismatch", "DATA_LAYOUT", "DEFAULT_ASSETS", "DESCRIBE_ASSETS",
    "DESCRIBE_GROUP", "ENHANCE_ASSETS", "ENHANCE_GROUP", "EXPANSION_ASSETS", "EXPANSION_LICENCE_NOTICE", "FLUX_SCHNELL_ASSETS", "FLUX_SCHNELL_GROUP",
    "FOOOCUS_COMMIT", "INPAINT_ASSETS", "INPAINT_GROUP", "OPTIONAL_ASSETS", "PERFORMANCE_LORA_ASSETS",
    "PERFORMANCE_LORA_GROUP", "UPSCALE_ASSETS", "UPSCALE_GROUP", "add_arguments", "cli_setup", "convert_pickle_to_safetensors", "download_file",
    "flux_schnell_paths", "plan_setup", "run_setup", "select_assets", "trust_pins",
]
