"""Tiny describe models for the tests (issue 16), written into a models folder where set-up would
put the real ones, so every door runs the real loading code (engine/describe/blip.py, tagger.py):

- a random BLIP captioner from a tiny ``BlipConfig`` and a BERT tokenizer built from a word list
  written here (whole words only, so one generated token is one word of the caption);
- an ONNX tagger made with the ``onnx`` helper API: the mean of each input channel (the input is
  BGR) → one linear layer → sigmoid, with biases chosen so the scores are known: each tag's score is
  :data:`TAG_SCORES` (the blue-dependent tag is near 1 for a blue image, near 0 for a red one).
"""

from __future__ import annotations

import math
from pathlib import Path

from engine.describe.blip import BLIP_DIR
from engine.describe.tagger import TAGGER_DIR, TAGGER_MODEL_FILE, TAGGER_TAGS_FILE

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
WORDS = ("a", "picture", "of", "cat", "dog", "red", "blue", "house", "tree", "sky", "river", "man", "woman", "on",
         "the", "with", "small", "big", "green", "field")
#: The tag file: (name, category). Rating (9) first, then general (0), then character (4), as WD14's.
TAGS = (("general", "9"), ("sensitive", "9"), ("smile", "0"), ("long_hair", "0"), ("ribbon_(hair)", "0"),
        ("blue_theme", "0"), ("hatsune_miku", "4"), ("other_character", "4"))
#: The constant scores (sigmoid of the bias); None = depends on the image's blue channel.
TAG_SCORES = {"general": 0.99, "sensitive": 0.99, "smile": 0.36, "long_hair": 0.30, "ribbon_(hair)": 0.9,
              "blue_theme": None, "hatsune_miku": 0.86, "other_character": 0.84}
#: blue_theme's logit is BLUE_GAIN·(mean B / 255) − BLUE_GAIN/2: ±5 for an all-blue / all-red image.
BLUE_GAIN = 10.0
TAGGER_SIZE_PX = 32


def write_tiny_blip(folder: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True, bos_token="[DEC]")
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    config = BlipConfig(
        text_config={"vocab_size": len(SPECIAL_TOKENS) + len(WORDS), "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 96,
                     "bos_token_id": ids["[DEC]"], "sep_token_id": ids["[SEP]"], "pad_token_id": ids["[PAD]"],
                     "eos_token_id": ids["[SEP]"]},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 384, "patch_size": 48},
        projection_dim=16)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def write_tiny_tagger(folder: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in TAGS]
    weight = np.zeros((3, len(names)), dtype=np.float32)
    bias = np.zeros(len(names), dtype=np.float32)
    for i, name in enumerate(names):
        score = TAG_SCORES[name]
        if score is None:
            weight[0, i] = BLUE_GAIN / 255.0  # channel 0 of a BGR input is blue
            bias[i] = -BLUE_GAIN / 2
        else:
            bias[i] = _logit(score)
    nodes = [
        helper.make_node("ReduceMean", ["input_1"], ["pooled"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["pooled", "weight"], ["logits0"]),
        helper.make_node("Add", ["logits0", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", TAGGER_SIZE_PX, TAGGER_SIZE_PX, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(names)])],
        initializer=[numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime of the supported range
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / TAGGER_MODEL_FILE))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{cat},{100 - i}" for i, (name, cat) in enumerate(TAGS)]
    (folder / TAGGER_TAGS_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def install_tiny_describe_models(models_dir: Path) -> Path:
    """Both tiny models where the Describer reads them: ``<models_dir>/describe/...``."""
    write_tiny_blip(models_dir / BLIP_DIR)
    write_tiny_tagger(models_dir / TAGGER_DIR)
    return models_dir
