"""Tiny Enhance mask models for the tests (issue 16), written where set-up puts the real ones
(engine/masking/service.py), so every door runs the real loading code:

- GroundingDINO: a random ``GroundingDinoForObjectDetection`` from a tiny config (Swin backbone and
  BERT text encoder of one layer), a BERT tokenizer built here from a word list, and an image
  processor at 64 px. With random weights the box scores are arbitrary but strictly between 0 and 1,
  so ``box_threshold=0`` finds a box for every query and ``box_threshold=1`` finds none.
- SAM: a random ``SamModel`` from a tiny config, its processor at 64 px.
- rembg: an ONNX graph made with the ``onnx`` helper API whose output plane is blue − red of the
  input, so after rembg's min-max normalisation the mask is high exactly where the image is blue.
"""

from __future__ import annotations

from pathlib import Path

from engine.masking.service import GROUNDING_DINO_DIR, REMBG_DIR, SAM_DIRS

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = ("face", "hand", "eye", "hair", "body", "mouth", "cat", "dog", ".", "a")


def write_tiny_grounding_dino(folder: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import (
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    config = GroundingDinoConfig(
        backbone_config={"model_type": "swin", "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 1],
                         "window_size": 2, "image_size": 64, "out_features": ["stage1", "stage2"]},
        text_config={"model_type": "bert", "vocab_size": len(SPECIAL_TOKENS) + len(WORDS), "hidden_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "max_position_embeddings": 64},
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=4, num_feature_levels=2, encoder_n_points=1,
        decoder_n_points=1, max_text_len=16, use_timm_backbone=False, use_pretrained_backbone=False)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    # The Hub repositories' layout: the image processor's preprocessor_config.json and the tokenizer's
    # files side by side (a transformers 5 processor would write one processor_config.json instead).
    image_processor.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def write_tiny_sam(folder: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel

    folder.mkdir(parents=True, exist_ok=True)
    config = SamConfig(
        vision_config={"hidden_size": 16, "output_channels": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16, "mlp_dim": 16, "window_size": 2,
                       "global_attn_indexes": [0], "num_pos_feats": 8},
        prompt_encoder_config={"hidden_size": 16, "image_size": 64, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_dim": 16,
                             "iou_head_hidden_dim": 16})
    torch.manual_seed(seed)
    SamModel(config).save_pretrained(str(folder), safe_serialization=True)
    image_processor = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    image_processor.save_pretrained(str(folder))  # preprocessor_config.json, as the Hub repositories
    return folder


def write_tiny_rembg(path: Path) -> Path:
    """blue − red of the NCHW input as the one output plane (1×1×S×S), any size S."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path.parent.mkdir(parents=True, exist_ok=True)
    inits = [numpy_helper.from_array(np.array(v, dtype=np.int64), name) for name, v in
             (("s_red", [0]), ("e_red", [1]), ("s_blue", [2]), ("e_blue", [3]), ("axis", [1]))]
    nodes = [helper.make_node("Slice", ["input.1", "s_red", "e_red", "axis"], ["red"]),
             helper.make_node("Slice", ["input.1", "s_blue", "e_blue", "axis"], ["blue"]),
             helper.make_node("Sub", ["blue", "red"], ["mask"])]
    graph = helper.make_graph(
        nodes, "tiny_rembg", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, "h", "w"])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def install_tiny_enhance_models(models_dir: Path, *, rembg_models: tuple[str, ...] = ("u2netp",),
                                sam_models: tuple[str, ...] = ("vit_b",)) -> Path:
    write_tiny_grounding_dino(models_dir / GROUNDING_DINO_DIR)
    for name in sam_models:
        write_tiny_sam(models_dir / SAM_DIRS[name])
    for name in rembg_models:
        write_tiny_rembg(models_dir / REMBG_DIR / f"{name}.onnx")
    return models_dir
