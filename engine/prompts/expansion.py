"""Fooocus V2 prompt expansion: GPT-2 sampling restricted to a word list (spec §2.5).

LICENCE: outside Fooocus, the word list (positive.txt), the expansion weights and this algorithm
are for non-commercial use only (CC BY-NC 4.0, spec §0). We ship none of the assets; the feature
is off unless an operator installs them, and the first use logs :data:`NON_COMMERCIAL_NOTICE`.

The model folder holds a ``GPT2LMHeadModel`` config + **safetensors** weights, the GPT-2
tokenizer files and ``positive.txt``. Fooocus ships ``pytorch_model.bin`` (a pickle); we never
unpickle it, so it must be converted to safetensors offline first.

torch and transformers are imported only when an expansion is built or run.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.errors import AssetsMissing, UnsafeFile
from engine.prompts.assembly import safe_str

if TYPE_CHECKING:
    import torch

log = logging.getLogger("hooocus.expansion")

#: spec §2.5: the bias of every token outside the word list (and of tokens already used).
NEG_INF = -8192.0
#: GPT-2 id of ',' which stays open at every step.
COMMA_TOKEN_ID = 11
#: spec §2.5 step 2 (Fooocus SEED_LIMIT_NUMPY): the expansion seed is ``seed mod 2^32``.
SEED_LIMIT = 2**32
#: spec §2.5 step 5: the prompt plus expansion fills up to a multiple of this many GPT-2 tokens.
TOKEN_BLOCK = 75
#: spec §2.5 step 6.
TOP_K = 100

NON_COMMERCIAL_NOTICE = (
    "Fooocus V2 prompt expansion is on. Outside Fooocus its word list, model and algorithm are "
    "licensed for non-commercial use only (CC BY-NC 4.0, Lvmin Zhang); do not use it commercially.")

WEIGHTS_FILE = "model.safetensors"
POSITIVE_WORDS_FILE = "positive.txt"
_TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_PICKLE_WEIGHTS = ("pytorch_model.bin", "fooocus_expansion.bin")


def missing_assets(model_dir: Path | str) -> list[str]:
    """What the folder lacks for the expansion (empty list = ready)."""
    folder = Path(model_dir)
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        missing.append(WEIGHTS_FILE)
    if not any(all((folder / f).is_file() for f in files) for files in _TOKENIZER_FILE_SETS):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if not (folder / POSITIVE_WORDS_FILE).is_file():
        missing.append(POSITIVE_WORDS_FILE)
    return missing


def is_available(model_dir: Path | str | None) -> bool:
    return model_dir is not None and Path(model_dir).is_dir() and not missing_assets(model_dir)


def load_positive_words(path: Path | str) -> list[str]:
    """positive.txt: one word per line, empty lines dropped (spec §2.5 step 1)."""
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line != ""]


#: transformers 4.42's ``clean_up_tokenization``, in its order. Fooocus's pinned transformers applies
#: it in ``batch_decode`` (GPT-2's tokenizer config leaves it on); transformers 5 no longer does for
#: BPE tokenizers, so we apply it ourselves to keep Fooocus's expansion text.
_CLEAN_UP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
    (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """Remove the spaces before punctuation and English contractions, as transformers 4.42 did."""
    for old, new in _CLEAN_UP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def expansion_token_budget(prompt_token_count: int) -> int:
    """spec §2.5 step 5: new tokens so the total is ``75 * ceil(L / 75)``."""
    return TOKEN_BLOCK * math.ceil(prompt_token_count / TOKEN_BLOCK) - prompt_token_count


def allowed_token_ids(vocab: Mapping[str, int], words: Iterable[str]) -> list[int]:
    """Ids of the vocab entries 'Ġ' + lower(word) (GPT-2's leading-space form), ascending."""
    wanted = {"\u0120" + word.lower() for word in words}
    return sorted(token_id for token, token_id in vocab.items() if token in wanted)


def build_expansion_bias(tokenizer: Any, words: Iterable[str]) -> torch.Tensor:
    """spec §2.5: ``[1, len(vocab)]`` float32, NEG_INF except 0 at the allowed word ids."""
    import torch

    vocab: Mapping[str, int] = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else tokenizer
    bias = torch.full((1, len(vocab)), NEG_INF, dtype=torch.float32)
    bias[0, allowed_token_ids(vocab, words)] = 0.0
    return bias


class ExpansionLogitsProcessor:
    """spec §2.5, at each step: ``scores + bias'`` where bias' is the word-list bias with every id
    already in the sequence banned (no repeats) and ',' always open.

    A plain callable in transformers' ``LogitsProcessor`` shape ``(input_ids, scores) -> scores``.
    """

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias  # [1, V]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(scores).expand(scores.shape[0], -1).clone()  # [B, V]
        bias.scatter_(1, input_ids.to(bias.device).long(), NEG_INF)
        bias[:, COMMA_TOKEN_ID] = 0.0
        return scores + bias


@dataclass(frozen=True)
class ExpansionInput:
    """What goes into ``generate`` for one prompt (spec §2.5 steps 3–5)."""

    text: str  # safe_str(prompt) + ','
    input_ids: list[int]
    max_new_tokens: int


@contextlib.contextmanager
def _seeded_torch_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the generators ``generate`` samples from, and restore them afterwards.

    transformers' ``generate`` has no generator argument: ``torch.multinomial`` draws from the
    global generator of the model's device. Fooocus calls ``transformers.set_seed`` (Python
    ``random``, numpy, torch CPU and all CUDA devices). Sampling reads only the torch generator of
    the model's device, so we seed the CPU generator and, on CUDA, that device's generator, inside
    ``torch.random.fork_rng`` so the caller's RNG state is unchanged afterwards. Python ``random``
    and numpy are not touched. This is safe because only the one worker thread runs torch, and the
    pipeline reseeds torch for the initial noise anyway (spec §7.4).
    """
    import torch

    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda_devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


class FooocusExpansion:
    """``expansion(prompt, seed) -> str``: the prompt followed by sampled words (spec §2.5).

    Build it from a folder with :meth:`__init__`, or from parts with :meth:`from_components`
    (tests). Not thread-safe; it belongs to the worker thread.
    """

    def __init__(self, model_dir: Path | str, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        folder = Path(model_dir)
        missing = missing_assets(folder)
        if missing:
            pickles = [name for name in _PICKLE_WEIGHTS if (folder / name).is_file()]
            if pickles and WEIGHTS_FILE in missing:
                raise UnsafeFile(f"{folder / pickles[0]} is a pickle; convert it to {WEIGHTS_FILE} offline "
                                 "(Hooocus never unpickles weight files)")
            raise AssetsMissing(f"Fooocus V2 expansion assets missing in {folder}: {', '.join(missing)}",
                                details={"missing": missing})
        import torch
        from transformers import AutoTokenizer, GPT2LMHeadModel

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                dtype=dtype or torch.float32)
        model.to(device).eval()
        self._setup(tokenizer, model, load_positive_words(folder / POSITIVE_WORDS_FILE))

    @classmethod
    def from_components(cls, tokenizer: Any, model: Any, positive_words: Sequence[str]) -> FooocusExpansion:
        """An expansion over a ready tokenizer and model (anything with GPT-2's ``generate``)."""
        self = cls.__new__(cls)
        self._setup(tokenizer, model, positive_words)
        return self

    def _setup(self, tokenizer: Any, model: Any, positive_words: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.bias = build_expansion_bias(tokenizer, positive_words)
        self.processor = ExpansionLogitsProcessor(self.bias)
        self._notice_logged = False
        self._notice_returned = False

    def take_notice(self) -> str | None:
        """The non-commercial notice the first time it is asked for, then None, so the pipeline can
        tell a client once (e.g. as a ``JobWarning`` event). Independent of the log line."""
        if self._notice_returned:
            return None
        self._notice_returned = True
        return NON_COMMERCIAL_NOTICE

    def prepare(self, prompt: str) -> ExpansionInput:
        """spec §2.5 steps 3–5, no model needed."""
        text = safe_str(prompt) + ","
        input_ids = list(self.tokenizer(text)["input_ids"])
        return ExpansionInput(text, input_ids, expansion_token_budget(len(input_ids)))

    def __call__(self, prompt: str, seed: int) -> str:
        if prompt == "":
            return ""
        if not self._notice_logged:  # the operator's log gets the licence notice on first use
            self._notice_logged = True
            log.warning(NON_COMMERCIAL_NOTICE)
        import torch
        from transformers import LogitsProcessorList

        prepared = self.prepare(prompt)
        if prepared.max_new_tokens == 0:
            return prepared.text[:-1]
        device = torch.device(getattr(self.model, "device", "cpu"))
        input_ids = torch.tensor([prepared.input_ids], dtype=torch.long, device=device)
        with torch.inference_mode(), _seeded_torch_rng(device, int(seed) % SEED_LIMIT):
            features = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=TOP_K,
                temperature=1.0, top_p=1.0, max_new_tokens=prepared.max_new_tokens,
                pad_token_id=getattr(self.model.config, "pad_token_id", None),
                logits_processor=LogitsProcessorList([self.processor]))
        decoded = self.tokenizer.batch_decode(features, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        # Only this (generate) path gets the clean-up; the zero-new-token return above does not.
        return safe_str(clean_up_tokenization(decoded))


def load_expansion(model_dir: Path | str | None, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[FooocusExpansion | None, str | None]:
    """``(expansion, None)`` when the assets are there, else ``(None, warning)``: the feature is
    then off and 'Fooocus V2' requests run without it. Never raises for missing assets."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None, f"Fooocus V2 expansion is off: no expansion folder ({model_dir})"
    try:
        return FooocusExpansion(model_dir, device=device, dtype=dtype), None
    except (AssetsMissing, UnsafeFile) as exc:
        message = f"Fooocus V2 expansion is off: {exc.message}"
        log.warning(message)
        return None, message
