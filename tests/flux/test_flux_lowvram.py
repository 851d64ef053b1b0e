"""The FLUX.1 low-VRAM path (engine/flux/lowvram.py): diffusers' group-offloading hooks are really
installed on the transformer (block by block), T5's encoder stack, CLIP-L and the VAE, they fire during
a job, and the result is bit-identical to the normal path (on the CPU, where the onload and offload
devices are both the CPU: the hooks run, only no bytes move). LoRA merges made under the hooks apply
and restore exactly (the reason the hooks run without side streams)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from diffusers.hooks.group_offloading import ModuleGroup

from engine.core.jobs import Engine, JobState
from engine.core.settings import Settings
from engine.flux.encode import encode_prompt
from engine.flux.lowvram import GROUP_OFFLOADING_HOOK, has_group_offloading, remove_flux_low_vram
from engine.flux.runner import FluxRunner, sample_flux
from hooocus.cli import build_parser
from tests.flux.test_flux_lora_jobs import KOHYA, write_loras

PARAMS = {"prompt": "a lighthouse at dusk", "width": 96, "height": 64, "seed": 11, "styles": [], "image_number": 1}
WAIT_S = 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data")
    write_loras(Settings(data_dir=data).models_dir / "loras")
    return data


def _runner(data_dir: Path, *, low_vram: bool, model: str = "demo-flux") -> FluxRunner:
    return FluxRunner(Settings(data_dir=data_dir, device="cpu", low_vram=low_vram), model=model)


def _group(module: torch.nn.Module) -> ModuleGroup:
    return module._diffusers_hook.get_hook(GROUP_OFFLOADING_HOOK).group


def test_the_hooks_are_installed_on_every_part_and_fire_during_a_job(data_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner(data_dir, low_vram=True)
    comps = runner._load().components
    normal = _runner(data_dir, low_vram=False)._load().components
    for module in (comps.transformer, comps.text_encoder_2, comps.text_encoder, comps.vae):
        assert has_group_offloading(module)
    assert not any(has_group_offloading(m) for m in (normal.transformer, normal.text_encoder_2, normal.vae))
    blocks = [*comps.transformer.transformer_blocks, *comps.transformer.single_transformer_blocks]
    t5_blocks = list(comps.text_encoder_2.encoder.block)
    # one group per block: each block is on the device alone
    assert len({id(_group(b)) for b in blocks}) == len(blocks) and len({id(_group(b)) for b in t5_blocks}) == len(t5_blocks)
    onloads: collections.Counter[int] = collections.Counter()
    original = ModuleGroup.onload_

    def counting(group: ModuleGroup) -> None:
        onloads[id(group)] += 1
        original(group)

    monkeypatch.setattr(ModuleGroup, "onload_", counting)
    with Engine(runner, max_queue=2) as engine:
        job = engine.submit({**PARAMS, "steps": 3})
        assert job.wait(WAIT_S) and job.state is JobState.DONE, job.events_after(0)[-1]
    assert all(onloads[id(_group(b))] == 3 for b in blocks)  # once per sampling step
    assert all(onloads[id(_group(b))] == 1 for b in t5_blocks)  # once: the prompt is encoded once
    assert onloads[id(_group(comps.text_encoder))] == 1
    assert onloads[id(_group(comps.vae.decoder.conv_out))] == 1  # the decode, through leaf hooks
    remove_flux_low_vram(comps)  # what the GPU benchmark does before diffusers' own offload
    assert not any(has_group_offloading(m) for m in (comps.transformer, comps.text_encoder_2, comps.text_encoder,
                                                      comps.vae))
    onloads.clear()
    with torch.inference_mode():
        comps.vae.decode(torch.zeros(1, comps.vae.config.latent_channels, 8, 8))
    assert not onloads


@pytest.mark.parametrize("model", ["demo-flux", "demo-flux-dev"])
def test_low_vram_latents_are_bit_identical_to_the_normal_path(data_dir: Path, model: str) -> None:
    latents, sequences = [], []
    for low_vram in (False, True):
        runner = _runner(data_dir, low_vram=low_vram, model=model)
        comps = runner._load().components
        with torch.inference_mode():
            text = encode_prompt(comps, "a lighthouse at dusk", max_sequence_length=32, device=runner.device)
            latents.append(sample_flux(comps, text, seed=3, width=64, height=48, steps=3, guidance=3.5,
                                       device=runner.device, dtype=text.sequence.dtype))
        sequences.append(text.sequence)
    assert torch.equal(sequences[0], sequences[1])
    assert torch.equal(latents[0], latents[1])


def test_low_vram_jobs_with_and_without_a_lora_give_the_normal_bytes(data_dir: Path) -> None:
    lora = {"loras": [{"name": KOHYA, "weight": 0.8}]}
    out = {}
    for low_vram in (False, True):
        with Engine(_runner(data_dir, low_vram=low_vram), max_queue=4) as engine:
            jobs = [engine.submit({**PARAMS, **extra}) for extra in ({}, lora, {})]
            for job in jobs:
                assert job.wait(WAIT_S) and job.state is JobState.DONE, job.events_after(0)[-1]
            out[low_vram] = [job.images[0].data for job in jobs]
    assert out[True] == out[False]
    assert out[True][1] != out[True][0] and out[True][2] == out[True][0]  # merged, then restored exactly


def test_the_low_vram_flag_reaches_the_settings_of_every_command() -> None:
    from engine.core.settings import settings_from_args

    for argv in (["generate", "x", "--low-vram"], ["serve", "--low-vram"], ["mcp", "--low-vram"]):
        assert settings_from_args(build_parser().parse_args(argv), env={})[0].low_vram is True
    assert settings_from_args(build_parser().parse_args(["generate", "x"]), env={})[0].low_vram is False
