"""The Mixtral v1 sentencepiece tokenizer (32000 pieces, BOS 1, EOS 2, no pad).

`load_tokenizer()` returns the model that ships inside the `mistral-common` wheel
(`mistral_common/data/tokenizer.model.v1`), so nothing is downloaded. A checkpoint
folder's own `tokenizer.model` wins when present (a real `mistralai/Mixtral-8x7B-v0.1`
folder has one; our HF exports copy it).

`encode` adds neither BOS nor EOS: the [INST] scheme in `data/chat.py` places them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"


def default_tokenizer_path() -> Path:
    """Path of the Mixtral v1 tokenizer inside the installed mistral-common wheel."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common is installed but has no {path}; reinstall mistral-common")
    return path


class Tokenizer:
    """Thin wrapper over `sentencepiece.SentencePieceProcessor` with the interface the project uses."""

    def __init__(self, model_file: str | Path):
        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # v1 has no pad piece (pad_id() == -1). Padding positions are always masked
        # (labels -100, attention/router masks False), so <unk> (0) is a safe filler.
        self.pad_id: int = self.sp.unk_id()
        self.vocab_size: int = self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (sentencepiece adds its dummy-prefix space)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load the tokenizer.

    Args:
        path: None for the Mixtral v1 model from mistral-common; a `tokenizer.model` file;
            or a checkpoint folder (its `tokenizer.model` is used when present, else v1).
    """
    if path is None:
        return Tokenizer(default_tokenizer_path())
    path = Path(path)
    if path.is_dir():
        candidate = path / TOKENIZER_FILE
        if candidate.is_file():
            return Tokenizer(candidate)
        log.warning("%s has no %s; using the Mixtral v1 tokenizer from mistral-common", path, TOKENIZER_FILE)
        return Tokenizer(default_tokenizer_path())
    if path.is_file():
        return Tokenizer(path)
    raise FileNotFoundError(f"tokenizer path {path} is neither a folder nor a file")
