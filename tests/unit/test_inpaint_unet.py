"""Inpaint head hook and .fooocus.patch merge on a diffusers UNet (engine/sdxl/inpaint_unet.py): the
feature lands on conv_in's output, removal and unmerge restore everything bit for bit, and the ldm
keys of a full-size SDXL UNet all map onto diffusers parameters."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
import torch

from engine.sdxl.inpaint_unet import InpaintEngine, InpaintHeadHook, InpaintPatchMismatch, match_inpaint_patch
from engine.sdxl.models.configs import component_config
from engine.sdxl.models.demo import demo_configs
from engine.sdxl.models.patching import FooocusPatch, patch_delta
from tests.paths import parity_dir, parity_skip_reason, sdxl_base_keys_file

#: The tiny UNet's ldm names (input block 0 = conv_in; 4.1 = the first attention block of level 1;
#: middle block 0/1 = first resnet / transformer) with the diffusers parameter each must land on.
TINY_PATCH_TARGETS = {
    "diffusion_model.input_blocks.0.0.weight": "conv_in.weight",
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight":
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.middle_block.0.in_layers.2.weight": "mid_block.resnets.0.conv1.weight",
    "diffusion_model.middle_block.0.emb_layers.1.bias": "mid_block.resnets.0.time_emb_proj.bias",
    "diffusion_model.middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
    "diffusion_model.output_blocks.2.2.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
}


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    """The demo base UNet's architecture, random weights (seeded, global RNG left as it was)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(99)
        model = UNet2DConditionModel.from_config(demo_configs("base")["unet"])
    return model.eval().requires_grad_(False)


def _inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"sample": torch.randn(batch, 4, 8, 8, generator=g), "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.randn(batch, 7, 64, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=g),
                                  "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)}}


def _run(unet: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0]


def _feature(unet: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, unet.conv_in.out_channels, 8, 8, generator=torch.Generator().manual_seed(seed))


def _fake_patch(shape: torch.Size, seed: int) -> FooocusPatch:
    """Per-output-row min/max like the parity stand-in (make_inpaint.py), so broadcasting is exercised."""
    g = torch.Generator().manual_seed(seed)
    rows = (shape[0],) + (1,) * (len(shape) - 1)
    w = torch.randint(0, 256, tuple(shape), generator=g, dtype=torch.uint8)
    w_min = (-0.05 * (1 + 0.25 * torch.rand(rows, generator=g))).half()
    w_max = (0.05 * (1 + 0.25 * torch.rand(rows, generator=g))).half()
    return FooocusPatch(w, w_min, w_max)


def _tiny_patches(unet: torch.nn.Module) -> dict[str, FooocusPatch]:
    params = dict(unet.named_parameters())
    return {key: _fake_patch(params[target].shape, i) for i, (key, target) in enumerate(TINY_PATCH_TARGETS.items())}


def _snapshot(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in unet.named_parameters()}


# ------------------------------------------------------------------------------------------ head hook


def test_head_hook_adds_the_feature_to_conv_in_output_for_every_row(unet: torch.nn.Module) -> None:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    feature = _feature(unet)
    with torch.no_grad():
        plain = unet.conv_in(x)
        hook = InpaintHeadHook(unet, feature)
        hooked = unet.conv_in(x)
        hook.remove()
        after = unet.conv_in(x)
    assert torch.equal(hooked, plain + feature)  # broadcast over cond and uncond rows alike
    assert torch.equal(after, plain)
    assert not hook.attached


def test_head_hook_changes_the_unet_output_and_removal_restores_it_exactly(unet: torch.nn.Module) -> None:
    inputs = _inputs()
    before = _run(unet, inputs)
    hook = InpaintHeadHook(unet, _feature(unet))
    with_head = _run(unet, inputs)
    hook.remove()
    hook.remove()  # idempotent
    assert (with_head - before).abs().max() > 1e-3
    assert torch.equal(_run(unet, inputs), before)


def test_head_hook_rejects_wrong_feature_shapes(unet: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="head feature must be"):
        InpaintHeadHook(unet, torch.zeros(1, 5, 8, 8))
    hook = InpaintHeadHook(unet, torch.zeros(1, unet.conv_in.out_channels, 4, 4))
    try:
        with pytest.raises(ValueError, match="but the latent is"):
            _run(unet, _inputs())
    finally:
        hook.remove()


# ---------------------------------------------------------------------------------------- patch merge


def test_patch_keys_in_ldm_naming_map_to_the_diffusers_parameters(unet: torch.nn.Module) -> None:
    match = match_inpaint_patch(unet, _tiny_patches(unet))
    assert {name for _component, name in match.patches} == set(TINY_PATCH_TARGETS.values())


def test_engine_merges_patch_as_weight_diff_and_remove_restores_bit_exactly(unet: torch.nn.Module) -> None:
    original = _snapshot(unet)
    inputs = _inputs()
    before = _run(unet, inputs)
    patches = _tiny_patches(unet)
    engine = InpaintEngine(unet, patches, feature=None)
    assert _snapshot(unet).keys() == original.keys() and all(torch.equal(p, original[n]) for n, p in _snapshot(unet).items())
    engine.apply()
    merged = _snapshot(unet)
    for key, target in TINY_PATCH_TARGETS.items():
        expected = original[target] + patch_delta(patches[key], 1.0, original[target].shape)
        assert torch.equal(merged[target], expected), target
    untouched = set(original) - set(TINY_PATCH_TARGETS.values())
    assert all(torch.equal(merged[name], original[name]) for name in untouched)
    assert (_run(unet, inputs) - before).abs().max() > 1e-3
    engine.remove()
    assert all(torch.equal(p, original[n]) for n, p in _snapshot(unet).items())
    assert torch.equal(_run(unet, inputs), before)


def test_engine_is_a_switch_for_the_synthetic_refiner(unet: torch.nn.Module) -> None:
    """apply → patched+head outputs; remove at the 'switch' → plain outputs; re-apply (next image) →
    the same patched outputs again; double apply is refused."""
    inputs = _inputs()
    plain = _run(unet, inputs)
    engine = InpaintEngine(unet, _tiny_patches(unet), _feature(unet))
    engine.apply()
    with pytest.raises(RuntimeError, match="already applied"):
        engine.apply()
    inpaint_out = _run(unet, inputs)
    engine.remove()
    assert torch.equal(_run(unet, inputs), plain)
    with engine:
        assert torch.equal(_run(unet, inputs), inpaint_out)
    assert not engine.applied
    assert torch.equal(_run(unet, inputs), plain)


def test_engine_context_restores_after_an_exception(unet: torch.nn.Module) -> None:
    original = _snapshot(unet)
    engine = InpaintEngine(unet, _tiny_patches(unet), _feature(unet))
    with pytest.raises(KeyError), engine:
        raise KeyError("cancelled mid-sampling")
    assert not engine.applied and not unet.conv_in._forward_hooks
    assert all(torch.equal(p, original[n]) for n, p in _snapshot(unet).items())


def test_patch_that_does_not_fit_is_refused_before_touching_weights(unet: torch.nn.Module) -> None:
    original = _snapshot(unet)
    unknown = {"diffusion_model.input_blocks.99.0.weight": _fake_patch(torch.Size([4, 4]), 0)}
    with pytest.raises(InpaintPatchMismatch, match="no parameter for diffusion_model.input_blocks.99.0.weight"):
        InpaintEngine(unet, unknown, None)
    wrong_shape = {"diffusion_model.input_blocks.0.0.weight": _fake_patch(torch.Size([32, 4, 1, 1]), 0)}
    with pytest.raises(InpaintPatchMismatch, match="shape diffusion_model.input_blocks.0.0.weight"):
        match_inpaint_patch(unet, wrong_shape)
    assert all(torch.equal(p, original[n]) for n, p in _snapshot(unet).items())


# ------------------------------------------------------------------------------ full-size key mapping


@pytest.fixture(scope="module")
def sdxl_unet_on_meta() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(component_config("base", "unet"))


def _meta_patches(keys_and_shapes: list[tuple[str, list[int]]]) -> dict[str, FooocusPatch]:
    return {key: FooocusPatch(torch.empty(shape, dtype=torch.uint8, device="meta"), 0.0, 0.0)
            for key, shape in keys_and_shapes}


def test_every_sdxl_unet_key_maps_onto_a_diffusers_parameter_of_its_shape(sdxl_unet_on_meta: torch.nn.Module) -> None:
    """A real inpaint patch may cover any UNet tensor: all 1,680 diffusion_model.* keys of an SDXL base
    checkpoint (tests/data/sdxl_base_keys.json), weights and biases, map one-to-one with equal shapes."""
    rows = json.loads(sdxl_base_keys_file().read_text())
    prefix = "model.diffusion_model."
    keys = [("diffusion_model." + key[len(prefix):], shape) for key, shape, _dtype in rows if key.startswith(prefix)]
    match = match_inpaint_patch(sdxl_unet_on_meta, _meta_patches(keys))
    assert len(match.patches) == len(keys)
    assert {name for _c, name in match.patches} == {n for n, _p in sdxl_unet_on_meta.named_parameters()}


def test_parity_stand_in_patch_keys_map(sdxl_unet_on_meta: torch.nn.Module) -> None:
    """The keys of the parity stand-in patch (make_inpaint.py's documented subset, from its own code)."""
    reason = parity_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    folder = parity_dir()
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("make_inpaint", folder / "make_inpaint.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        keys = [(key, shape) for key, _checkpoint_key, shape in module.patch_keys()]
    finally:
        sys.path.remove(str(folder))
    assert keys and all(re.match(r"diffusion_model\.", k) for k, _s in keys)
    match = match_inpaint_patch(sdxl_unet_on_meta, _meta_patches(keys))
    assert ("unet", "conv_in.weight") in match.patches and len(match.patches) == len(keys)


# ------------------------------------------------------------------------------- the chain end to end


def test_inpaint_chain_fits_together_end_to_end_on_tiny_models(unet: torch.nn.Module) -> None:
    """crop → fill → two encodes (inpaint first, then fill, one posterior generator) → latent mask →
    head feature → InpaintEngine + InpaintDenoiser → euler with the synthetic-refiner switch →
    decode → paste back → colour correction, on the tiny UNet/VAE. Checks the pieces agree on
    shapes, the engine is off after the switch (weights restored), the known region of the result
    is the fill latent, and pixels outside the soft mask are the input's."""
    import numpy as np
    from diffusers import AutoencoderKL

    from engine.imaging.inpaint import (
        color_correction,
        compute_initial_abcd,
        crop_mask_for_generation,
        fooocus_fill,
        paste_back,
        solve_abcd,
    )
    from engine.imaging.latent_mask import grey_filled_pixels, latent_mask
    from engine.imaging.masks import morphological_open
    from engine.imaging.resize import resample_image
    from engine.sdxl.img2img import initial_x, inpaint_start_latent, partial_denoise_sigmas
    from engine.sdxl.models.inpaint import InpaintDenoiser, inpaint_head_feature, inpaint_head_feed
    from engine.sdxl.models.loading import SDXL_VAE_SCALING_FACTOR as SF
    from engine.sdxl.sampling.model_sampling import DiscreteEPS
    from engine.sdxl.sampling.noise import prepare_noise
    from engine.sdxl.sampling.samplers import sample
    from engine.sdxl.vae_io import posterior_generator, vae_decode, vae_encode

    with torch.random.fork_rng():
        torch.manual_seed(7)
        vae = AutoencoderKL.from_config(demo_configs()["vae"]).eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    mask = np.zeros((96, 80), dtype=np.uint8)
    mask[40:60, 30:50] = 255
    box = solve_abcd(96, 80, compute_initial_abcd(mask > 0), 0.618)
    a, b, c, d = box
    size = 64  # the generation size (Fooocus: shape-ceil 1024; tiny here)
    crop = resample_image(image[a:b, c:d], size, size)
    crop_mask = crop_mask_for_generation(mask[a:b, c:d], size, size)
    fill = fooocus_fill(crop, crop_mask)

    generator = posterior_generator()
    latent_inpaint = vae_encode(vae, grey_filled_pixels(crop, crop_mask), generator)
    latent_fill = vae_encode(vae, torch.from_numpy(fill).permute(2, 0, 1)[None].float() / 255.0, generator)
    lmask = latent_mask(crop_mask, tuple(latent_fill.shape[-2:]))
    head = torch.randn(unet.conv_in.out_channels, 5, 3, 3, generator=torch.Generator().manual_seed(3)) / 45**0.5
    feature = inpaint_head_feature(inpaint_head_feed(lmask, latent_inpaint, scaling_factor=SF), head)
    original = _snapshot(unet)

    cond = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(4))
    added = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    ms = DiscreteEPS()

    def x0_model(x: torch.Tensor) -> torch.Tensor:  # eps UNet → x0 at the current sigma
        eps = unet(ms.calculate_input(current["sigma"], x), ms.timestep(current["sigma"]), encoder_hidden_states=cond,
                   added_cond_kwargs=added, return_dict=False)[0]
        return ms.calculate_denoised(current["sigma"], eps, x)

    seed, steps, switch = 4321, 3, 1
    wrapper = InpaintDenoiser(latent_fill, lmask, seed, scaling_factor=SF)
    current: dict[str, torch.Tensor] = {}

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        current["sigma"] = sigma
        return wrapper(x0_model, x, sigma)

    engine = InpaintEngine(unet, _tiny_patches(unet), feature)
    plan = partial_denoise_sigmas("euler", "karras", steps, 1.0)
    noise, noise_generator = prepare_noise(seed, latent_fill.shape)
    start = inpaint_start_latent(latent_fill, disable_initial_latent=False)
    assert torch.equal(initial_x(start, noise, plan.sigmas[0], scaling_factor=SF),
                       noise * torch.sqrt(1.0 + plan.sigmas[0] ** 2) + latent_fill * SF)
    applied_at: list[bool] = []

    def on_step(info: dict) -> None:
        applied_at.append(engine.applied)
        if info["i"] == switch:  # the joint swap fires after step `switch` is evaluated (spec §8)
            engine.remove()

    with torch.no_grad(), engine:
        out = sample(denoiser, "euler", plan.sigmas, noise, latent=start * SF, generator=noise_generator,
                     callback=on_step)
    assert applied_at == [True, True, False]
    assert all(torch.equal(p, original[n]) for n, p in _snapshot(unet).items())
    known = (1.0 - lmask).bool().expand_as(out)
    assert torch.allclose(out[known], (latent_fill * SF)[known])

    decoded = vae_decode(vae, out / SF)
    gen = (decoded[0].permute(1, 2, 0).numpy() * 255.0).clip(0, 255).astype(np.uint8)
    assert gen.shape == (size, size, 3)
    soft = morphological_open(mask)
    result = color_correction(image, paste_back(image, gen, box), soft)
    assert result.shape == image.shape
    assert np.array_equal(result[soft == 0], image[soft == 0])
