"""Describe (issue 16, spec §12.5): the text rules, the two preprocessings, both tiny models through
the real loaders, and the Describer's bounds, cancel, device lock and model_missing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.core.errors import HooocusError, InvalidRequest, JobCancelled, ModelMissing, QueueFull
from engine.core.settings import Settings
from engine.describe import text
from engine.describe.service import DescribeParams, Describer
from tests.describe_models import TAGS, WORDS
from tests.images import data_uri, solid_png

BLUE = (0, 0, 255)
RED = (255, 0, 0)


@pytest.fixture
def models_dir(describe_models_dir: Path) -> Path:
    return describe_models_dir


@pytest.fixture
def describer(models_dir: Path):
    d = Describer(Settings(data_dir=models_dir.parent, device="cpu"))
    yield d
    d.close()


# -- text rules ---------------------------------------------------------------------------------------------


def _table() -> text.TagTable:
    csv = "tag_id,name,category,count\n" + "".join(f"{i},{n},{c},1\n" for i, (n, c) in enumerate(TAGS))
    return text.parse_tag_csv(csv)


def test_tag_table_blocks_start_at_the_first_general_and_character_rows() -> None:
    table = _table()
    assert table.names == tuple(n for n, _ in TAGS)
    assert table.general_index == [c for _, c in TAGS].index("0")
    assert table.character_index == [c for _, c in TAGS].index("4")
    with pytest.raises(ValueError):
        text.parse_tag_csv("tag_id,name,category,count\n0,general,9,1\n0,smile,0,1\n")  # no character block


def test_thresholds_are_strict_and_characters_come_first_in_file_order() -> None:
    table = _table()
    scores = {"general": 1.0, "sensitive": 1.0, "smile": 0.35, "long_hair": 0.3501, "ribbon_(hair)": 0.9,
              "blue_theme": 0.5, "hatsune_miku": 0.85, "other_character": 0.8501}
    picked = text.select_tags(table, [scores[n] for n in table.names])
    # 0.35 and 0.85 exactly are not "above" the thresholds; ratings are never tags.
    assert picked == ["other_character", "long_hair", "ribbon_(hair)", "blue_theme"]
    assert text.select_tags(table, [scores[n] for n in table.names], exclude=["long_hair"]) == [
        "other_character", "ribbon_(hair)", "blue_theme"]
    with pytest.raises(ValueError):
        text.select_tags(table, [0.5])


def test_tag_clean_up_escapes_brackets_and_replaces_underscores() -> None:
    assert text.tags_to_prompt(["hatsune_miku", "ribbon_(hair)", ":)"]) == "hatsune miku, ribbon \\(hair\\), :\\)"


def test_style_sets_and_both_modes() -> None:
    assert text.styles_for(["photo"]) == ["Fooocus V2", "Fooocus Enhance", "Fooocus Sharp"]
    assert text.styles_for(["anime"]) == ["Fooocus V2", "Fooocus Masterpiece"]
    assert text.styles_for(text.modes_of("both")) == ["Fooocus V2", "Fooocus Enhance", "Fooocus Sharp",
                                                      "Fooocus Masterpiece"]
    assert text.modes_of("both") == ("photo", "anime")


def test_fooocus_type_names_match_the_reference_tables(refdata: Path) -> None:
    import json

    types = json.loads((refdata / "tables" / "flags_and_lists.json").read_text())["describe_types"]
    assert sorted(text.FOOOCUS_TYPE_BY_MODE.values()) == sorted(types)
    defaults = json.loads((refdata / "tables" / "config_defaults.json").read_text())["values"]
    assert [text.FOOOCUS_TYPE_BY_MODE[text.DEFAULT_MODE]] == defaults["default_describe_content_type"]


# -- preprocessing ------------------------------------------------------------------------------------------


def test_tagger_input_keeps_aspect_pads_white_and_is_bgr() -> None:
    from engine.describe.tagger import tagger_input

    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[..., 0] = 255  # red
    batch = tagger_input(rgb, 32)
    assert batch.shape == (1, 32, 32, 3) and batch.dtype == np.float32
    # 20×10 scaled to 32×16, pasted at y = (32 − 16) // 2 = 8 on white.
    assert (batch[0, :8] == 255).all() and (batch[0, 24:] == 255).all()
    assert batch[0, 16, 16].tolist() == [0.0, 0.0, 255.0]  # red in BGR order, 0..255, not normalised


def test_blip_pixels_are_384_bicubic_and_clip_normalised() -> None:
    from engine.describe.blip import BLIP_IMAGE_SIZE_PX, CLIP_MEAN, CLIP_STD, blip_pixels

    rgb = np.full((30, 50, 3), 128, np.uint8)
    rgb[..., 2] = 0
    pixels = blip_pixels(rgb)
    assert tuple(pixels.shape) == (1, 3, BLIP_IMAGE_SIZE_PX, BLIP_IMAGE_SIZE_PX) == (1, 3, 384, 384)
    # A flat image stays flat through bicubic; then (x − mean) / std per RGB channel.
    expected = [(v / 255.0 - m) / s for v, m, s in zip((128, 128, 0), CLIP_MEAN, CLIP_STD)]
    np.testing.assert_allclose(pixels[0, :, 100, 200].numpy(), expected, rtol=1e-5, atol=1e-5)


# -- the models through the Describer -----------------------------------------------------------------------


def test_anime_tags_from_the_tiny_onnx_tagger(describer: Describer) -> None:
    blue = describer.describe({"image": data_uri(solid_png(48, 40, BLUE)), "mode": "anime"})
    assert blue.prompt == "hatsune miku, smile, ribbon \\(hair\\), blue theme"
    assert blue.styles == ["Fooocus V2", "Fooocus Masterpiece"]
    red = describer.describe({"image": data_uri(solid_png(48, 40, RED)), "mode": "anime"})
    assert red.prompt == "hatsune miku, smile, ribbon \\(hair\\)"  # blue_theme depends on the B channel


def test_photo_caption_from_the_tiny_blip(describer: Describer, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.describe import blip

    seen: dict = {}
    real = blip.Captioner.describe

    def spy(self, rgb, **kw):
        original = self.model.generate

        def generate(**kwargs):
            seen.update(kwargs)
            return original(**kwargs)

        self.model.generate = generate
        try:
            return real(self, rgb, **kw)
        finally:
            del self.model.generate

    monkeypatch.setattr(blip.Captioner, "describe", spy)
    result = describer.describe({"image": data_uri(solid_png(64, 48, RED))})
    assert result.styles == ["Fooocus V2", "Fooocus Enhance", "Fooocus Sharp"] and result.mode == "photo"
    words = result.prompt.split()
    assert set(words) <= set(WORDS)
    # min_length 10 / max_length 75 count the 4 prompt tokens ([DEC] a picture of) and the final [SEP].
    assert 10 - 4 <= len(words) <= 75 - 4
    # BLIP's prompt: the tokenizer's [CLS] a picture of [SEP], with [CLS] replaced by [DEC] (the text
    # decoder's bos, id 5 in the tiny vocabulary) by generate itself; the [SEP] is dropped there.
    assert seen["input_ids"].tolist() == [[5, 6, 7, 8, 3]]
    for key, value in blip.GENERATE_KWARGS.items():
        assert seen[key] == value
    assert blip.GENERATE_KWARGS == {"do_sample": True, "num_beams": 1, "max_length": 75, "min_length": 10,
                                    "top_p": 0.9, "repetition_penalty": 1.1}


def test_both_modes_join_photo_then_anime(describer: Describer) -> None:
    result = describer.describe({"image": data_uri(solid_png(32, 32, BLUE)), "mode": "both"})
    caption, tags = result.prompt.split(", ", 1)
    assert tags == "hatsune miku, smile, ribbon \\(hair\\), blue theme" and set(caption.split()) <= set(WORDS)
    assert result.styles == text.styles_for(["photo", "anime"])


def test_missing_weights_name_the_file_and_the_setup_command(tmp_path: Path) -> None:
    d = Describer(Settings(data_dir=tmp_path, device="cpu"))
    try:
        for mode, file in (("photo", "config.json"), ("anime", "model.onnx")):
            with pytest.raises(ModelMissing) as info:
                d.describe({"image": data_uri(solid_png(8, 8, RED)), "mode": mode})
            assert file in info.value.message and "hooocus setup --only describe" in info.value.message
            assert info.value.details["file"] == file
    finally:
        d.close()


def test_bad_input_fails_before_anything_runs(describer: Describer) -> None:
    for params, loc in (({"image": "nope"}, ("image",)), ({"image": data_uri(b"not a png")}, ("image",)),
                        ({"image": data_uri(solid_png(8, 8, RED)), "mode": "sketch"}, ("mode",)),
                        ({"image": data_uri(solid_png(8, 8, RED)), "extra": 1}, ("extra",))):
        with pytest.raises(HooocusError) as info:
            describer.submit(params)
        assert info.value.loc == loc and info.value.code in ("invalid_request", "invalid_image")
    with pytest.raises(InvalidRequest):
        DescribeParams.parse(["image"])


# -- bounds, cancel, device lock ------------------------------------------------------------------------------


def _gated(settings: Settings, gate: threading.Event, **kw):
    started = threading.Event()

    def run(mode, rgb, cancel):
        started.set()
        while not gate.wait(0.01):
            cancel.raise_if_set()
        return "ok"

    return Describer(settings, run_mode=run, **kw), started


def test_cancel_and_the_pending_bound(tmp_path: Path) -> None:
    gate = threading.Event()
    d, started = _gated(Settings(data_dir=tmp_path), gate, max_pending=2)
    image = {"image": data_uri(solid_png(8, 8, RED))}
    try:
        first = d.submit(image)
        second = d.submit(image)
        with pytest.raises(QueueFull):
            d.submit(image)
        assert started.wait(5)
        first.cancel("user")
        with pytest.raises(JobCancelled):
            first.future.result(timeout=5)
        gate.set()
        assert second.future.result(timeout=5).prompt == "ok"
    finally:
        gate.set()
        d.close()


def test_describe_waits_for_the_running_job_and_a_timeout_cancels(tmp_path: Path) -> None:
    gate = threading.Event()
    gate.set()
    lock = threading.Lock()
    d, started = _gated(Settings(data_dir=tmp_path), gate, device_lock=lock)
    image = {"image": data_uri(solid_png(8, 8, RED))}
    try:
        lock.acquire()  # a generation holds the device
        task = d.submit(image)
        time.sleep(0.3)
        assert not started.is_set() and not task.future.done()
        lock.release()
        assert task.future.result(timeout=5).prompt == "ok"
        lock.acquire()
        with pytest.raises(JobCancelled) as info:
            d.describe(image, timeout_s=0.2)
        assert info.value.reason == "timeout"
        lock.release()
    finally:
        d.close()


def test_the_engine_worker_holds_the_device_lock_while_a_job_runs() -> None:
    from engine.core.jobs import Engine
    from engine.core.testing import FakeRunner

    held: list[bool] = []

    class Probe(FakeRunner):
        def run(self, ctx):
            held.append(engine.device_lock.locked())
            super().run(ctx)

    engine = Engine(Probe()).start()
    try:
        job = engine.submit({"prompt": "x", "image_number": 1})
        assert job.wait(30)
        assert held == [True] and not engine.device_lock.locked()
    finally:
        engine.close()


def test_ctrl_c_while_waiting_cancels_the_describe(tmp_path: Path) -> None:
    """What `hooocus describe` relies on: a KeyboardInterrupt in the waiting thread cancels the work."""
    import _thread
    import signal

    # interrupt_main does nothing while SIGINT is ignored, which is how a non-interactive shell starts
    # a background job (`pytest ... &`): use Python's own Ctrl-C handler whoever launched pytest.
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)

    gate = threading.Event()
    d, started = _gated(Settings(data_dir=tmp_path), gate)
    seen = []
    real_submit = d.submit

    def spy(*args, **kwargs):
        task = real_submit(*args, **kwargs)
        seen.append(task)
        return task

    d.submit = spy  # type: ignore[method-assign]
    timer = threading.Timer(0.3, _thread.interrupt_main)
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            d.describe({"image": data_uri(solid_png(8, 8, RED))}, timeout_s=10)
        assert seen[0].cancel_token.is_set() and seen[0].cancel_token.reason == "interrupted"
        with pytest.raises(JobCancelled):
            seen[0].future.result(timeout=5)
    finally:
        timer.cancel()
        gate.set()
        d.close()
        signal.signal(signal.SIGINT, previous_handler)
