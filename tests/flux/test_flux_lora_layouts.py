"""FLUX.1 LoRA layouts (issue 17) at full size, without weights: the real FLUX.1 [dev] transformer and CLIP-L
are built on the ``meta`` device (no memory, no values) and a LoRA in each layout that covers every module
the layout can target is matched onto them: every key matched, none skipped, every fused BFL/XLabs tensor
(qkv, linear1) split into the right diffusers modules with the right rows and shapes, and the submit-time
check (:func:`lora_fit_problem`) accepts the file. On the tiny model, each layout merges to exactly the
weights its diffusers-layout equivalent (the same matrices, the fused up-projection split by rows by hand)
merges to. A FLUX.1 Control LoRA is refused with a clear error.

Layouts: diffusers/PEFT (``transformer.<module>.lora_A.weight``), kohya (``lora_unet_<bfl module>`` +
``lora_te1_``), BFL/ComfyUI (``diffusion_model.<bfl module>.lora_A.weight`` + ``text_encoders.clip_l.``) and
XLabs (``double_blocks.N.processor.qkv_lora1.down.weight``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.core.errors import ModelInvalid
from engine.flux.configs import bundled_config
from engine.flux.lora import lora_fit_problem, match_flux_lora, merge_flux_loras
from tests.flux.tiny import build_tiny, tiny_configs

#: diffusers-down: diffusers names with kohya's lora_down/lora_up endings; kohya-diffusers: kohya's
#: ``lora_transformer_`` + diffusers module names.
LAYOUTS = ("diffusers", "diffusers-down", "kohya", "kohya-diffusers", "bfl", "xlabs")
UNFUSED = ("diffusers", "diffusers-down", "kohya-diffusers")
ALPHA = 2.0
Ref = tuple[str, str]  # (component, parameter name)


@dataclass(frozen=True)
class Source:
    """One LoRA module of a file: its key names and the diffusers weights its up-projection's rows are, in
    row order (``swap``: the two halves of the rows are swapped first: BFL's final adaLN is (shift, scale),
    diffusers' ``norm_out.linear`` is (scale, shift))."""

    down_key: str
    up_key: str
    alpha_key: str | None
    targets: tuple[Ref, ...]
    swap: bool = False


def bfl_table(config: dict) -> list[tuple[str, tuple[str, ...], bool]]:
    """Every linear module of a BFL FLUX.1 transformer with the diffusers modules its rows become, written
    out from the FLUX.1 architecture (independently of engine.flux.loading's table, which the code uses)."""
    rows = [("img_in", ("x_embedder",), False), ("txt_in", ("context_embedder",), False),
            ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), False),
            ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), False),
            ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), False),
            ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), False),
            ("final_layer.linear", ("proj_out",), False),
            ("final_layer.adaLN_modulation.1", ("norm_out.linear",), True)]
    if config["guidance_embeds"]:
        rows += [("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), False),
                 ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), False)]
    for i in range(config["num_layers"]):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        rows += [(f"{b}.img_mod.lin", (f"{d}.norm1.linear",), False),
                 (f"{b}.txt_mod.lin", (f"{d}.norm1_context.linear",), False),
                 (f"{b}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), False),
                 (f"{b}.txt_attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"), False),
                 (f"{b}.img_attn.proj", (f"{d}.attn.to_out.0",), False),
                 (f"{b}.txt_attn.proj", (f"{d}.attn.to_add_out",), False),
                 (f"{b}.img_mlp.0", (f"{d}.ff.net.0.proj",), False), (f"{b}.img_mlp.2", (f"{d}.ff.net.2",), False),
                 (f"{b}.txt_mlp.0", (f"{d}.ff_context.net.0.proj",), False),
                 (f"{b}.txt_mlp.2", (f"{d}.ff_context.net.2",), False)]
    for i in range(config["num_single_layers"]):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        rows += [(f"{b}.modulation.lin", (f"{d}.norm.linear",), False),
                 (f"{b}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"), False),
                 (f"{b}.linear2", (f"{d}.proj_out",), False)]
    return rows


def linear_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def sources(layout: str, config: dict, models: dict[str, nn.Module]) -> list[Source]:
    """Every module ``layout`` can name on a FLUX.1 of ``config`` (with CLIP-L where the layout has it)."""
    t = "transformer"
    clip = [("text_encoder", name) for name in linear_modules(models["text_encoder"])]
    if layout == "diffusers":
        out = [Source(f"transformer.{m}.lora_A.weight", f"transformer.{m}.lora_B.weight", f"transformer.{m}.alpha",
                      ((t, m + ".weight"),)) for m in linear_modules(models[t])]
        return out + [Source(f"text_encoder.text_model.{m}.lora_A.weight", f"text_encoder.text_model.{m}.lora_B.weight",
                             f"text_encoder.text_model.{m}.alpha", ((c, m + ".weight"),)) for c, m in clip]
    if layout == "diffusers-down":
        return [Source(f"{c}.{'text_model.' if c == 'text_encoder' else ''}{m}.lora_down.weight",
                       f"{c}.{'text_model.' if c == 'text_encoder' else ''}{m}.lora_up.weight", None,
                       ((c, m + ".weight"),)) for c, model in models.items() for m in linear_modules(model)]
    if layout == "kohya-diffusers":
        head = {"transformer": "lora_transformer_", "text_encoder": "lora_te1_text_model_"}
        return [Source(*(f"{head[c]}{m.replace('.', '_')}{end}" for end in (".lora_down.weight", ".lora_up.weight",
                                                                             ".alpha")), ((c, m + ".weight"),))
                for c, model in models.items() for m in linear_modules(model)]
    if layout in ("kohya", "bfl"):
        def names(stem: str) -> tuple[str, str, str]:
            if layout == "kohya":
                return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"
            return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", f"{stem}.alpha"

        head, clip_head = ("lora_unet_", "lora_te1_text_model_") if layout == "kohya" else (
            "diffusion_model.", "text_encoders.clip_l.transformer.text_model.")
        flat = (lambda s: s.replace(".", "_")) if layout == "kohya" else (lambda s: s)
        out = [Source(*names(head + flat(bfl)), tuple((t, n + ".weight") for n in targets), swap)
               for bfl, targets, swap in bfl_table(config)]
        return out + [Source(*names(clip_head + flat(m)), ((c, m + ".weight"),)) for c, m in clip]
    assert layout == "xlabs"  # attention only, no alpha, no CLIP-L
    out = []
    for i in range(config["num_layers"]):
        b, d = f"double_blocks.{i}.processor", f"transformer_blocks.{i}.attn"
        for lora, targets in (("qkv_lora1", ("to_q", "to_k", "to_v")),
                              ("qkv_lora2", ("add_q_proj", "add_k_proj", "add_v_proj")),
                              ("proj_lora1", ("to_out.0",)), ("proj_lora2", ("to_add_out",))):
            out.append(Source(f"{b}.{lora}.down.weight", f"{b}.{lora}.up.weight", None,
                              tuple((t, f"{d}.{n}.weight") for n in targets)))
    for i in range(config["num_single_layers"]):
        b, d = f"single_blocks.{i}.processor", f"single_transformer_blocks.{i}"
        out += [Source(f"{b}.qkv_lora.down.weight", f"{b}.qkv_lora.up.weight", None,
                       tuple((t, f"{d}.attn.{n}.weight") for n in ("to_q", "to_k", "to_v"))),
                Source(f"{b}.proj_lora.down.weight", f"{b}.proj_lora.up.weight", None, ((t, f"{d}.proj_out.weight"),))]
    return out


Factory = Callable[[int, int], tuple[Tensor, Tensor]]  # (rows, in features) -> (up, down)


def lora_file(layout: str, config: dict, models: dict[str, nn.Module], make: Factory,
              alpha: float = ALPHA) -> tuple[dict[str, Tensor], list[Source]]:
    params = {c: dict(m.named_parameters()) for c, m in models.items()}
    tensors: dict[str, Tensor] = {}
    srcs = sources(layout, config, models)
    for src in srcs:
        shapes = [params[c][n].shape for c, n in src.targets]
        assert len({s[1] for s in shapes}) == 1  # the pieces of a fused tensor share its input
        tensors[src.up_key], tensors[src.down_key] = make(sum(s[0] for s in shapes), shapes[0][1])
        if src.alpha_key:
            tensors[src.alpha_key] = torch.tensor(alpha)  # real: the scale is read from it
    return tensors, srcs


def pieces(src: Source, up: Tensor, params: dict[str, dict[str, Tensor]]) -> dict[Ref, Tensor]:
    """The diffusers weights' up-projections of ``src``: its rows (halves swapped where BFL's order
    differs), split in row order by the target weights' heights."""
    if src.swap:
        first, second = up.chunk(2, dim=0)
        up = torch.cat([second, first], dim=0)
    heights = [params[c][n].shape[0] for c, n in src.targets]
    return dict(zip(src.targets, up.split(heights, dim=0), strict=True))


@pytest.fixture(scope="module")
def full_size() -> tuple[dict, dict[str, nn.Module]]:
    """FLUX.1 [dev] (the one with the guidance embedder: a superset of schnell's modules) and CLIP-L on
    ``meta``: the real shapes, no memory."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = bundled_config("transformer", "dev")
    with torch.device("meta"):
        models = {"transformer": FluxTransformer2DModel.from_config(config),
                  "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(bundled_config("text_encoder")))}
    return config, models


def test_the_test_table_is_every_linear_module_of_full_size_flux(full_size) -> None:
    config, models = full_size
    named = {n for _, targets, _ in bfl_table(config) for n in targets}
    assert named == set(linear_modules(models["transformer"]))
    assert len(named) == 504 and len(linear_modules(models["text_encoder"])) == 12 * 6  # 19x14 + 38x6 + 10


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_module_of_each_layout_matches_full_size_flux_on_meta(layout: str, full_size) -> None:
    config, models = full_size
    rank = 4

    def meta(rows: int, width: int) -> tuple[Tensor, Tensor]:
        return torch.empty(rows, rank, device="meta"), torch.empty(rank, width, device="meta")

    tensors, srcs = lora_file(layout, config, models, meta)
    match = match_flux_lora(tensors, models, name=layout)
    assert match.unmatched_keys == () and not match.skipped
    params = {c: dict(m.named_parameters()) for c, m in models.items()}
    expected = {ref for src in srcs for ref in src.targets}
    assert set(match.deltas) == expected
    if layout != "xlabs":  # every linear weight of the transformer and CLIP-L
        assert expected == {(c, n + ".weight") for c, m in models.items() for n in linear_modules(m)}
    else:  # XLabs trains the attention: q/k/v and the output projections
        assert len(expected) == config["num_layers"] * 8 + config["num_single_layers"] * 4
    for ref, delta in match.deltas.items():
        weight = params[ref[0]][ref[1]]
        assert delta.up.shape == (weight.shape[0], rank) and delta.down.shape == (rank, weight.shape[1])
        assert delta.scale == (1.0 if layout in ("xlabs", "diffusers-down") else ALPHA / rank)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_rows_go_to_the_right_full_size_modules_and_the_file_fits(layout: str, full_size,
                                                                          tmp_path: Path) -> None:
    """Rank-1 real tensors whose up-projection holds its own row number, so each diffusers weight's piece
    shows which rows of the fused tensor it got (exact: integers below 2**24 in float32)."""
    config, models = full_size

    def numbered(rows: int, width: int) -> tuple[Tensor, Tensor]:
        return torch.arange(rows, dtype=torch.float32)[:, None], torch.ones(1, width)

    tensors, srcs = lora_file(layout, config, models, numbered)
    match = match_flux_lora(dict(tensors), models, name=layout)
    params = {c: dict(m.named_parameters()) for c, m in models.items()}
    assert match.unmatched_keys == ()
    fused = 0
    for src in srcs:
        fused += len(src.targets) > 1
        for ref, piece in pieces(src, tensors[src.up_key], params).items():
            assert torch.equal(match.deltas[ref].up, piece), (src.up_key, ref)
            assert torch.equal(match.deltas[ref].down, tensors[src.down_key])
    assert fused == (2 * config["num_layers"] + config["num_single_layers"]
                     if layout not in UNFUSED else 0)  # qkv twice per double block, linear1 / qkv_lora once per single

    path = tmp_path / f"{layout}.safetensors"  # the submit-time check reads the header only (bf16 halves the file)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, path)
    assert lora_fit_problem(path, models, name=layout) is None


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "diffusers"])
def test_each_layout_merges_as_its_diffusers_equivalent_on_the_tiny_model(layout: str) -> None:
    """Both merges run the same float32 operations on the same numbers (weight + (strength * alpha/rank) *
    (up_piece @ down), the piece being rows of the fused up-projection), so they agree bit for bit."""
    config = tiny_configs("dev")["transformer"]
    layout_model, reference_model = build_tiny("dev", seed=5), build_tiny("dev", seed=5)
    models = {c: layout_model[c] for c in ("transformer", "text_encoder")}
    reference = {c: reference_model[c] for c in ("transformer", "text_encoder")}
    generator = torch.Generator().manual_seed(7)
    rank = 4

    def random(rows: int, width: int) -> tuple[Tensor, Tensor]:
        return torch.randn(rows, rank, generator=generator) * 0.3, torch.randn(rank, width, generator=generator) * 0.3

    tensors, srcs = lora_file(layout, config, models, random)
    params = {c: dict(m.named_parameters()) for c, m in models.items()}
    equivalent: dict[str, Tensor] = {}  # diffusers/PEFT naming, built by hand
    for src in srcs:
        for (component, name), piece in pieces(src, tensors[src.up_key], params).items():
            module = f"transformer.{name.removesuffix('.weight')}" if component == "transformer" else (
                f"text_encoder.text_model.{name.removesuffix('.weight')}")
            equivalent |= {f"{module}.lora_A.weight": tensors[src.down_key], f"{module}.lora_B.weight": piece}
            if src.alpha_key:
                equivalent[f"{module}.alpha"] = tensors[src.alpha_key]
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    merge_flux_loras(models, [(match_flux_lora(tensors, models, name=layout), 0.8)])
    merge_flux_loras(reference, [(match_flux_lora(equivalent, reference, name="reference"), 0.8)])
    targets = {ref for src in srcs for ref in src.targets}
    for component, model in models.items():
        after, expected = model.state_dict(), reference[component].state_dict()
        assert all(torch.equal(after[k], expected[k]) for k in after)
        changed = {(component, k) for k in after if not torch.equal(after[k], before[component][k])}
        assert changed == {ref for ref in targets if ref[0] == component}


def test_a_flux_control_lora_is_refused_with_a_clear_error(full_size, tmp_path: Path) -> None:
    """BFL's Canny/Depth LoRAs train the q/k norm scales in full and widen img_in for the control image."""
    config, models = full_size
    tensors = {"img_in.lora_A.weight": torch.zeros(4, 128), "img_in.lora_B.weight": torch.zeros(3072, 4),
               "double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 3072),
               "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(9216, 4),
               "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(128),
               "double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(128)}
    with pytest.raises(ModelInvalid, match="Control LoRA"):
        match_flux_lora(tensors, models, name="canny")
    path = tmp_path / "flux1-canny-dev-lora.safetensors"
    save_file(tensors, path)
    assert "Control LoRA" in (lora_fit_problem(path, models, name="canny") or "")


@pytest.mark.parametrize("layout", ("kohya", "diffusers"))
def test_a_dora_file_is_refused_not_merged_as_a_plain_lora(layout: str, full_size) -> None:
    """DoRA re-normalises each updated weight by its ``dora_scale`` magnitudes: merging only up@down (what
    diffusers' loader does after dropping those tensors with a warning) would apply a different update."""
    config, models = full_size
    rank = 4

    def meta(rows: int, width: int) -> tuple[Tensor, Tensor]:
        return torch.empty(rows, rank, device="meta"), torch.empty(rank, width, device="meta")

    tensors, srcs = lora_file(layout, config, models, meta)
    stem = srcs[0].down_key.removesuffix(".lora_down.weight").removesuffix(".lora_A.weight")
    tensors[f"{stem}.dora_scale"] = torch.empty(1, 3072, device="meta")
    with pytest.raises(ModelInvalid, match="DoRA"):
        match_flux_lora(tensors, models, name="dora")


@pytest.mark.parametrize(("prefix", "down", "up"), [
    ("", ".lora_A.weight", ".lora_B.weight"),  # BFL's own trainer names, no prefix
    ("model.diffusion_model.", ".lora_A.weight", ".lora_B.weight"),
    ("base_model.model.", ".lora_A.weight", ".lora_B.weight"),  # fal's PEFT wrapper names
    ("diffusion_model.", ".lora_down.weight", ".lora_up.weight"),  # ComfyUI names, kohya endings
])
def test_the_bfl_layout_under_each_prefix_and_ending_matches_the_same(prefix: str, down: str, up: str,
                                                                       full_size) -> None:
    config, models = full_size
    rank = 4

    def meta(rows: int, width: int) -> tuple[Tensor, Tensor]:
        return torch.empty(rows, rank, device="meta"), torch.empty(rank, width, device="meta")

    tensors, _ = lora_file("bfl", config, models, meta)
    plain = match_flux_lora(tensors, models, name="bfl")

    def renamed(key: str) -> str:
        if key.startswith("diffusion_model."):
            key = prefix + key.removeprefix("diffusion_model.")
        return key.replace(".lora_A.weight", down).replace(".lora_B.weight", up)

    variant = match_flux_lora({renamed(k): v for k, v in tensors.items()}, models, name="variant")
    assert variant.unmatched_keys == () and len(variant.deltas) == len(plain.deltas) == 504 + 72
    assert {ref: (d.up.shape, d.down.shape, d.scale) for ref, d in variant.deltas.items()} == {
        ref: (d.up.shape, d.down.shape, d.scale) for ref, d in plain.deltas.items()}


def test_a_dev_lora_on_full_size_schnell_applies_without_its_guidance_embedder_keys(full_size) -> None:
    """schnell has no guidance embedder: a LoRA trained on [dev] that also trains it leaves those 6 keys
    unmatched (fewer than MAX_UNMATCHED_KEYS) and applies to everything else."""
    from diffusers import FluxTransformer2DModel

    config, models = full_size
    with torch.device("meta"):
        schnell = {"transformer": FluxTransformer2DModel.from_config(bundled_config("transformer", "schnell")),
                   "text_encoder": models["text_encoder"]}

    def meta(rows: int, width: int) -> tuple[Tensor, Tensor]:
        return torch.empty(rows, 4, device="meta"), torch.empty(4, width, device="meta")

    tensors, _ = lora_file("kohya", config, models, meta)
    match = match_flux_lora(tensors, schnell, name="dev-lora")
    assert not match.skipped and len(match.deltas) == 504 - 2 + 72
    assert match.unmatched_keys == tuple(sorted(f"lora_unet_guidance_in_{layer}{end}" for layer in ("in_layer", "out_layer")
                                                for end in (".alpha", ".lora_down.weight", ".lora_up.weight")))


def test_the_kohya_split_agrees_with_diffusers_own_converter_at_full_size(full_size) -> None:
    """diffusers' ``_convert_kohya_flux_lora_to_diffusers`` (hard-coded to full-size widths, which is why
    the runner has its own) is an independent statement of the same transformer mapping: at full size
    every module's pieces must be the same. alpha = rank, since diffusers 0.42 drops the final layer's
    alpha (kohya's sd-scripts scales every module by alpha/rank, as this code does). CLIP-L is left out:
    its mapping is one to one, and diffusers gives it a legacy naming of its own."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    config, models = full_size

    def numbered(rows: int, width: int) -> tuple[Tensor, Tensor]:
        return torch.arange(rows, dtype=torch.float32)[:, None], torch.arange(width, dtype=torch.float32)[None, :]

    tensors, _ = lora_file("kohya", config, models, numbered, alpha=1.0)
    ours = match_flux_lora(dict(tensors), models, name="kohya")
    # diffusers scales some tensors in place: give it its own copies
    theirs = FluxLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in tensors.items()})
    transformer = {name.removesuffix(".weight"): d for (c, name), d in ours.deltas.items() if c == "transformer"}
    assert len(transformer) == 504
    for module, delta in transformer.items():
        # diffusers names block modules "transformer.<module>", the embedders and final layer bare
        prefix = next(p for p in ("transformer.", "") if f"{p}{module}.lora_A.weight" in theirs)
        assert delta.scale == 1.0
        assert torch.equal(theirs[f"{prefix}{module}.lora_B.weight"], delta.up), module
        assert torch.equal(theirs[f"{prefix}{module}.lora_A.weight"], delta.down), module


def test_a_kohya_split_qkv_file_block_diagonal_up_merges_as_three_separate_loras() -> None:
    """sd-scripts' ``split_qkv`` trains q, k and v apart and saves them fused: down = [down_q; down_k; down_v]
    (3r rows), up block-diagonal (q's rows use only q's r columns). Splitting up by rows (as for any fused
    file) gives q the update up_q @ down_q plus exact zeros, so it equals three plain rank-r LoRAs.
    Bound: both sides sum the same r nonzero products per element (the added 0.0 terms are exact), so the
    only possible difference is the summation order a matmul kernel picks for K = 3r instead of r; that is
    at most r * eps(float32) * sum|products| per element (the classic bound for a reordered sum), times
    strength * scale, plus one rounding of the weight add (eps * |w|). Measured on this CPU: 0.0 for all three
    (the bound's smallest element is ~7e-9)."""
    config = tiny_configs("dev")["transformer"]
    layout_model, reference_model = build_tiny("dev", seed=9), build_tiny("dev", seed=9)
    models = {"transformer": layout_model["transformer"]}
    reference = {"transformer": reference_model["transformer"]}
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    generator = torch.Generator().manual_seed(11)
    # kohya's scale is alpha over the stored rank (3r = 12): 3 / 12 = 1 / 4, the PEFT equivalent's 1 / r
    # exactly, so both merges multiply by the same float
    rank, strength, alpha = 4, 0.8, 3.0
    ups = [torch.randn(inner, rank, generator=generator) * 0.3 for _ in range(3)]
    downs = [torch.randn(rank, inner, generator=generator) * 0.3 for _ in range(3)]  # to_q's input: inner
    up = torch.block_diag(*ups)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    fused = {f"{stem}.lora_down.weight": torch.cat(downs), f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
    equivalent: dict[str, Tensor] = {}
    for name, piece_up, piece_down in zip(("to_q", "to_k", "to_v"), ups, downs, strict=True):
        module = f"transformer.transformer_blocks.0.attn.{name}"
        equivalent |= {f"{module}.lora_A.weight": piece_down, f"{module}.lora_B.weight": piece_up,
                       f"{module}.alpha": torch.tensor(alpha / 3)}
    before = {k: v.clone() for k, v in models["transformer"].state_dict().items()}
    merge_flux_loras(models, [(match_flux_lora(fused, models, name="split_qkv"), strength)])
    merge_flux_loras(reference, [(match_flux_lora(equivalent, reference, name="reference"), strength)])
    params, expected = dict(models["transformer"].named_parameters()), dict(reference["transformer"].named_parameters())
    eps = torch.finfo(torch.float32).eps
    for name, piece_up, piece_down in zip(("to_q", "to_k", "to_v"), ups, downs, strict=True):
        key = f"transformer_blocks.0.attn.{name}.weight"
        bound = rank * eps * strength * (alpha / (3 * rank)) * (piece_up.abs() @ piece_down.abs()) + eps * expected[key].abs()
        assert ((params[key] - expected[key]).abs() <= bound).all(), name
        assert not torch.equal(params[key], before[key])
