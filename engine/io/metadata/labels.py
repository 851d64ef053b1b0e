"""The tables both directions share: Fooocus/A1111 labels and names (spec §13.1, §13.3)."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

MetadataList = list[tuple[str, str, Any]]

# spec §13.3: Fooocus flags.KSAMPLER then flags.SAMPLER_EXTRA, sampler -> A1111 name, in this order
# (reading maps a name back to the FIRST key that has it, so "DPM++ 2M SDE" reads as dpmpp_2m_sde).
A1111_SAMPLER_NAMES: dict[str, str] = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "heunpp2": "", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive",
    "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_gpu": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "", "dpmpp_3m_sde_gpu": "", "ddpm": "", "lcm": "LCM", "tcd": "TCD", "restart": "Restart",
    "ddim": "DDIM", "uni_pc": "UniPC", "uni_pc_bh2": "",
}
# spec §13.3: samplers that never get " Karras" appended.
CIVITAI_NO_KARRAS: tuple[str, ...] = ("euler", "euler_ancestral", "heun", "dpm_fast", "dpm_adaptive", "ddim",
                                      "uni_pc")

# spec §13.3: metadata key -> A1111 label.
A1111_LABELS: dict[str, str] = {
    "negative_prompt": "Negative prompt", "steps": "Steps", "sampler": "Sampler", "seed": "Seed",
    "resolution": "Size", "guidance_scale": "CFG scale", "sharpness": "Sharpness", "adm_guidance": "ADM Guidance",
    "base_model": "Model", "base_model_hash": "Model hash", "performance": "Performance", "scheduler": "Scheduler",
    "vae": "VAE", "raw_prompt": "Raw prompt", "raw_negative_prompt": "Raw negative prompt",
    "refiner_model": "Refiner", "refiner_model_hash": "Refiner hash", "adaptive_cfg": "Adaptive CFG",
    "clip_skip": "Clip skip", "overwrite_switch": "Overwrite Switch", "refiner_swap_method": "Refiner Swap Method",
    "freeu": "FreeU", "lora_hashes": "Lora hashes", "lora_weights": "Lora weights", "version": "Version",
    "created_by": "User",
    # Inpaint/outpaint images (Fooocus's Load Parameters keys inpaint_method / inpaint_engine_version).
    "inpaint_method": "Inpaint Mode", "inpaint_engine_version": "Inpaint Engine Version",
    # Ours (Fooocus ignores labels it does not know): images made with the random-weight demo model.
    "is_demo": "Demo model",
    # Ours (issue 17): the model family of a FLUX.1 image ("flux"); SDXL images do not write it.
    "model_family": "Model family",
}
A1111_KEYS: dict[str, str] = {label: key for key, label in A1111_LABELS.items()}
NEGATIVE_PREFIX = "Negative prompt:"

DEFAULT_VAE_LABEL = "Default (model)"  # spec §13.1 / config default_vae
ADAPTIVE_CFG_DEFAULT = 7.0  # spec §14 default_cfg_tsnr: the value that is not written


def file_stem(name: str) -> str:
    return PurePath(name).stem
