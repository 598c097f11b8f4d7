"""Mixtral's sentencepiece tokenizers: v1 (Mixtral-8x7B) and v3 (Mixtral-8x22B), told apart by the file.

    v1   32000 pieces; "[INST]" is plain text; control pieces <s> (1) and </s> (2) only
    v3   32768 pieces; control pieces [INST] (3), [/INST] (4), [TOOL_CALLS] (5), [AVAILABLE_TOOLS] (6),
         [/AVAILABLE_TOOLS] (7), [TOOL_RESULTS] (8), [/TOOL_RESULTS] (9), [IMG] (10), ...

The version is read from the file's own pieces (`Tokenizer.version`), never from a flag: a control piece
"[INST]" makes it v3 (v2, Mistral-7B-v0.2's, has the same first ten pieces but "[control_8]" where v3 has
"[IMG]", and is refused: no Mixtral uses it). mistral_common names its files by version; a model folder's
`tokenizer.model` carries no name, so the pieces are the only reliable source.

Which file (`load_tokenizer(model_path, fallback)`): a model folder's own `tokenizer.model` wins (a real
`mistralai/Mixtral-8x22B-Instruct-v0.1` folder has one; our exports copy it); else `model.tokenizer` of the
config, a path or the name of a file shipped inside the mistral-common wheel
(`mistral_instruct_tokenizer_240323.model.v3`); else v1 (`tokenizer.model.v1` from mistral-common). Nothing is
downloaded.

`encode` adds neither BOS nor EOS and never produces a control piece (text "[INST]" or "</s>" is text, as in
mistral_common): the chat schemes in `data/chat.py` place every control token.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
V1_FILE = "tokenizer.model.v1"
V3_FILE = "mistral_instruct_tokenizer_240323.model.v3"
# v3's control pieces by name (the ids are read from the file)
V3_CONTROLS = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
               "[/TOOL_RESULTS]")


def mistral_common_file(name: str) -> Path:
    """Path of a tokenizer file shipped inside the installed mistral-common wheel (`V1_FILE`, `V3_FILE`)."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / name
    if not path.is_file():
        shipped = sorted(p.name for p in path.parent.glob("*.model*"))
        raise FileNotFoundError(f"mistral-common has no tokenizer file {name!r} (it ships {shipped})")
    return path


def default_tokenizer_path() -> Path:
    """Path of the Mixtral v1 tokenizer inside the installed mistral-common wheel."""
    return mistral_common_file(V1_FILE)


def v3_tokenizer_path() -> Path:
    """Path of the Mixtral-8x22B (v3) tokenizer inside the installed mistral-common wheel."""
    return mistral_common_file(V3_FILE)


def detect_version(sp: spm.SentencePieceProcessor, path: Path) -> str:
    """"v1" or "v3" from the model's pieces; ValueError for a Mistral tokenizer no Mixtral uses."""
    inst = sp.piece_to_id("[INST]")
    if inst == sp.unk_id() or not sp.is_control(inst):
        return "v1"
    missing = [c for c in V3_CONTROLS if not sp.is_control(sp.piece_to_id(c))]
    if missing or sp.piece_to_id("[IMG]") == sp.unk_id():
        raise ValueError(f"{path}: a Mistral tokenizer with control pieces but not v3's ({missing or 'no [IMG]'}: "
                         f"v2, Mistral-7B-v0.2's?); Mixtral uses v1 (8x7B) or v3 (8x22B)")
    return "v3"


class Tokenizer:
    """Thin wrapper over `sentencepiece.SentencePieceProcessor` with the interface the project uses.

    `version` is "v1" or "v3"; `control` maps v3's control pieces to their ids ({} for v1).
    """

    def __init__(self, model_file: str | Path):
        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # Neither version has a pad piece (pad_id() == -1). Padding positions are always masked
        # (labels -100, attention/router masks False), so <unk> (0) is a safe filler.
        self.pad_id: int = self.sp.unk_id()
        self.vocab_size: int = self.sp.vocab_size()
        self.version: str = detect_version(self.sp, self.path)
        self.control: dict[str, int] = ({c: self.sp.piece_to_id(c) for c in V3_CONTROLS}
                                        if self.version == "v3" else {})

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (sentencepiece adds its dummy-prefix space)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; control tokens ([INST], [TOOL_CALLS], ...) are dropped, as sentencepiece does."""
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, {self.version}, vocab_size={self.vocab_size})"


def _named(name: str | Path) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        return path / TOKENIZER_FILE
    if len(path.parts) == 1:
        return mistral_common_file(str(name))
    raise FileNotFoundError(f"model.tokenizer={name}: neither a tokenizer file, a folder with {TOKENIZER_FILE}, "
                            f"nor the name of a file shipped with mistral-common")


def load_tokenizer(path: str | Path | None = None, fallback: str | Path | None = None) -> Tokenizer:
    """Load the tokenizer.

    Args:
        path: a checkpoint folder (its `tokenizer.model` is used when present), a `tokenizer.model` file,
            or None.
        fallback: the tokenizer when `path` has none (`model.tokenizer`): a file, or the name of a file
            shipped with mistral-common. None: Mixtral v1.
    """
    if path is not None:
        path = Path(path)
        if path.is_file():
            return Tokenizer(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer path {path} is neither a folder nor a file")
        if (path / TOKENIZER_FILE).is_file():
            return Tokenizer(path / TOKENIZER_FILE)
    if fallback is not None:
        return Tokenizer(_named(fallback))
    if path is not None:
        log.warning("%s has no %s; using the Mixtral v1 tokenizer from mistral-common", path, TOKENIZER_FILE)
    return Tokenizer(default_tokenizer_path())
