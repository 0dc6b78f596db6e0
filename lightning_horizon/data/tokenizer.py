"""The default tokenizer (a small byte-level BPE trained offline on the bundled data) and loading of user tokenizers.

A tokenizer is used for training the way the exported model directory will load it (:func:`as_exported`):
``AutoTokenizer.from_pretrained`` picks the tokenizer class from the model's ``config.json`` as well as from the
tokenizer files, and for some families (``qwen2``, ``phi3``, ...) it rebuilds the tokenizer with that family's own
normalizer and pre-tokenizer, whatever ``tokenizer.json`` says. Training on the reloaded tokenizer makes the token ids
of training and of the exported model the same by construction.

The default tokenizer itself splits text as Qwen2 / Llama 3 do (NFC, the Qwen2 pre-tokenization regex, one digit per
token, then byte level), so it tokenizes identically under every class that loads it.

``build_default_tokenizer()`` needs no download: it trains a 2048-token byte-level BPE on the bundled instruction set
with ``tokenizers`` (about a second), deterministically, and caches it under
``$LIGHTNING_HORIZON_CACHE`` (default ``~/.cache/lightning_horizon``) in ``tokenizer-<hash>``, where the hash covers
the training data, the settings and the ``tokenizers`` version. The cache is written to a temporary folder and
renamed into place, so an interrupted or concurrent build never leaves a half-written tokenizer behind.

Its chat template is ChatML with ``{% generation %}`` markers around each assistant reply and its ``<|im_end|>``, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` tells which tokens carry the loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_horizon.data.errors import DataError

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
DEFAULT_VOCAB_SIZE = 2048
CACHE_ENV = "LIGHTNING_HORIZON_CACHE"
# Bump when the training recipe below changes, so old caches are not reused.
_RECIPE_VERSION = 2
# Qwen2's pre-tokenization (transformers' Qwen2Tokenizer hard-codes it for qwen2 models).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def bundled_data_path() -> Path:
    """The bundled instruction set (training split) that the default tokenizer is trained on."""
    return Path(__file__).resolve().parent / "assets" / "instruct.jsonl"


def default_cache_dir() -> Path:
    """``$LIGHTNING_HORIZON_CACHE`` if set, else ``~/.cache/lightning_horizon``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_horizon"


def _training_texts(data: bytes) -> list[str]:
    texts = []
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            for message in json.loads(line)["messages"]:
                texts.append(f"{message['role']}\n{message['content']}\n")
    return texts


def _settings_key(data: bytes, vocab_size: int) -> str:
    settings = {
        "recipe": _RECIPE_VERSION,
        "vocab_size": vocab_size,
        "special_tokens": SPECIAL_TOKENS,
        "chat_template": CHATML_TEMPLATE,
        "pretokenize": PRETOKENIZE_REGEX,
        "tokenizers": ".".join(tokenizers.__version__.split(".")[:2]),
    }
    digest = hashlib.sha256(data)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def train_tokenizer(data: bytes, vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on chat JSONL ``data`` (deterministic: same bytes, same vocabulary and merges)."""
    tok = Tokenizer(models.BPE())
    # Exactly Qwen2Tokenizer's pipeline, so that loading it as that class changes nothing. No post-processor: the
    # character offsets stay exact (the assistant mask maps characters to tokens with them).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(data), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=None,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHATML_TEMPLATE,
        model_max_length=1 << 30,
    )


def build_default_tokenizer(
    cache_dir: str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """The project's default tokenizer: trained on the bundled data on first use, then loaded from the disk cache.

    Args:
        cache_dir: folder holding ``tokenizer-<hash>`` sub-folders; default ``$LIGHTNING_HORIZON_CACHE`` or
            ``~/.cache/lightning_horizon``.
        vocab_size: BPE vocabulary size, special tokens included.
    """
    data = bundled_data_path().read_bytes()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"tokenizer-{_settings_key(data, vocab_size)}"
    if not (target / "tokenizer.json").is_file():
        tokenizer = train_tokenizer(data, vocab_size)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            tokenizer.save_pretrained(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "tokenizer.json").is_file():  # not a concurrent build that won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def load_tokenizer(name_or_path: str, require_chat_template: bool = True) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer from a local folder or a hub id.

    Sets the pad token to the EOS token when the tokenizer has none. Raises ``DataError`` when it cannot be loaded,
    or when ``require_chat_template`` and it has no chat template (plain-text data does not need one).
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir() and not any(any(local.glob(p)) for p in ("tokenizer*", "vocab*", "*.model")):
        raise DataError(
            f"{name_or_path}: the directory holds no tokenizer (no tokenizer.json, tokenizer_config.json, vocab or "
            f"*.model file; it has {_listing(local)})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # noqa: BLE001 - many loader errors (OSError, ValueError, HTTP); one clear message
        raise DataError(f"cannot load tokenizer {name_or_path!r}: {exc}") from exc
    return _checked(tokenizer, name_or_path, require_chat_template)


def _listing(directory: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        return "nothing: it is empty"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def as_exported(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """``tokenizer`` as ``AutoTokenizer.from_pretrained`` loads it back from a model directory with ``config``
    (the export's ``config.json``): for some model types that is another class with another pre-tokenizer, so
    training uses this one to see the ids the exported model will see."""
    with tempfile.TemporaryDirectory(prefix="lightning-horizon-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        config.to_json_file(str(Path(tmp) / "config.json"))
        loaded = AutoTokenizer.from_pretrained(tmp)
    if getattr(tokenizer, "chat_template", None) and not getattr(loaded, "chat_template", None):
        loaded.chat_template = tokenizer.chat_template
    return _checked(loaded, type(tokenizer).__name__, require_chat_template=False)


def _checked(
    tokenizer: PreTrainedTokenizerBase, name_or_path: str, require_chat_template: bool
) -> PreTrainedTokenizerBase:
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {name_or_path!r} has no chat template, which chat/prompt-response data needs: use a chat "
            "(instruct) model's tokenizer, set tokenizer.chat_template, or train on plain-text records"
        )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise DataError(f"tokenizer {name_or_path!r} has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
