"""Fixed lists and constants from Fooocus 2.5.5 (spec §7.3, §9, §10, §15; refdata/tables/).

Only data here: no logic, no imports of torch.
"""

from __future__ import annotations

from typing import Literal

# spec §7.3: the sampler list in UI order.
SAMPLER_NAMES: tuple[str, ...] = (
    "euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
    "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "tcd", "restart", "ddim",
    "uni_pc", "uni_pc_bh2",
)
SamplerName = Literal[
    "euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
    "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "tcd", "restart", "ddim",
    "uni_pc", "uni_pc_bh2",
]

# spec §7.2: the scheduler list in UI order.
SCHEDULER_NAMES: tuple[str, ...] = (
    "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "lcm", "turbo",
    "align_your_steps", "tcd", "edm_playground_v2.5",
)
SchedulerName = Literal[
    "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "lcm", "turbo",
    "align_your_steps", "tcd", "edm_playground_v2.5",
]

# spec §9: performance modes, Fooocus's spelling.
PERFORMANCE_NAMES: tuple[str, ...] = ("Quality", "Speed", "Extreme Speed", "Lightning", "Hyper-SD")
PerformanceName = Literal["Quality", "Speed", "Extreme Speed", "Lightning", "Hyper-SD"]

REFINER_SWAP_METHODS: tuple[str, ...] = ("joint", "separate", "vae")
RefinerSwapMethod = Literal["joint", "separate", "vae"]

OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
OutputFormat = Literal["png", "jpeg", "webp"]

METADATA_SCHEMES: tuple[str, ...] = ("fooocus", "a1111", "none")
MetadataScheme = Literal["fooocus", "a1111", "none"]

# spec §10: SDXL aspect ratios (width*height) and the UI default.
SDXL_ASPECT_RATIOS: tuple[str, ...] = (
    "704*1408", "704*1344", "768*1344", "768*1280", "832*1216", "832*1152", "896*1152", "896*1088",
    "960*1088", "960*1024", "1024*1024", "1024*960", "1088*960", "1088*896", "1152*896", "1152*832",
    "1216*832", "1280*768", "1344*768", "1344*704", "1408*704", "1472*704", "1536*640", "1600*640",
    "1664*576", "1728*576",
)
DEFAULT_ASPECT_RATIO = "1152*896"

# spec §2.3 / §2.4: pseudo-styles.
FOOOCUS_V2_STYLE = "Fooocus V2"
RANDOM_STYLE = "Random Style"
FOOOCUS_DEFAULT_STYLES: tuple[str, ...] = ("Fooocus V2", "Fooocus Enhance", "Fooocus Sharp")

# spec §7.4 / §15: seeds.
MAX_SEED = 2**63 - 1
SEED_MODULUS = 2**63

# spec §11.1
MAX_LORAS = 5
LORA_MIN_WEIGHT = -2.0
LORA_MAX_WEIGHT = 2.0

# Request limits (our own; Fooocus UI ranges where it has one, refdata/tables/webui_controls.json).
MIN_SIDE_PX = 64
MAX_SIDE_PX = 2048
MAX_IMAGE_NUMBER = 32
MAX_STEPS = 200
MAX_PROMPT_CHARS = 8192

FOOOCUS_VERSION = "Fooocus v2.5.5"

#: The built-in random-weight demo model, by name (engine/sdxl/models/demo.py), and the same model in the
#: refiner role so refiner swaps can be tried offline.
DEMO_MODEL = "demo"
DEMO_REFINER = "demo-refiner"
#: The built-in tiny random FLUX.1 models (engine/flux/demo.py, issue 17): schnell-style (4 steps, no
#: guidance) and dev-style (guidance-distilled, 28 steps).
DEMO_FLUX_MODEL = "demo-flux"
DEMO_FLUX_DEV_MODEL = "demo-flux-dev"
DEMO_FLUX_MODELS: tuple[str, ...] = (DEMO_FLUX_MODEL, DEMO_FLUX_DEV_MODEL)
