"""The project's tokenizer and [INST] chat scheme as Hugging Face tokenizer files, for exports.

`write_hf_tokenizer(model_file, folder)` writes `tokenizer.json` (fast), `tokenizer_config.json` (with the
chat template) and `special_tokens_map.json` such that, in transformers 4 and 5, vLLM and TGI:

    AutoTokenizer(folder)(text).input_ids           == [BOS] + sentencepiece(text)
    AutoTokenizer(folder).apply_chat_template(msgs)  == data.chat.encode_chat / encode_prompt(msgs)
                                                     == mistral_common's InstructTokenizerV1

(tests/unit/test_hf_tokenizer.py checks both on the real chats of ../shared/data and generated ones).

The tokenizer.json reproduces sentencepiece's BPE exactly rather than the usual Llama conversion, which
differs on runs of spaces ("  two" → sentencepiece [▁▁, ▁two]; a Metaspace pre-tokenizer splits at every ▁):

    normalizer      "▁" + text with " " → "▁"   (sentencepiece's dummy prefix and escaping; identity otherwise)
    pre-tokenizer   words = a run of ▁ with the non-▁ characters after it   (sentencepiece's SplitIntoWords
                    with whitespace-only pieces allowed)
    model           BPE over the sentencepiece vocabulary; the merge a+b ranks by the score of the piece a+b
                    (sentencepiece merges the pair whose result scores highest); unknown characters fall
                    back to <0xXX> byte pieces
    post-processor  <s> before the text

The chat template renders "<s>[INST] {system}\\n\\n{user} [/INST] {assistant}</s>[INST] ..." — each message
is a separate piece of text in data/chat.py, and the pre-tokenizer's word boundaries at "▁" plus the
control tokens' boundaries make the rendered string tokenize to the same ids. The literal strings "<s>",
"</s>" and "<unk>" inside a text are control tokens to an HF tokenizer unless it is called with
`split_special_tokens=True` (then they are text, as sentencepiece and mistral_common encode them); a chat
template needs them as control tokens, so inside a message they would be read so (as with mistralai's own
files) — which is why data/chat.py refuses a message that holds one.
"""

from __future__ import annotations

import json
from pathlib import Path

SPACE = "\u2581"

# Jinja (transformers' sandbox): the optional system prompt joins the first user turn with "\n\n"; roles
# alternate user/assistant; every answer ends with </s>. A conversation ending with a user turn is a prompt.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('roles must alternate user/assistant/user/... after an optional system message') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system -%}{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- else -%}{{- ' ' + message['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


def _bpe(model_file: str | Path):
    """(vocab {piece: id}, merges [(a, b)] best first) of a sentencepiece BPE model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise ValueError(f"{model_file}: a sentencepiece BPE model is expected")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    score = {p.piece: p.score for p in proto.pieces}
    normal = {p.piece for p in proto.pieces if p.type in (pb.ModelProto.SentencePiece.NORMAL,
                                                          pb.ModelProto.SentencePiece.USER_DEFINED)}
    merges = []
    for piece in normal:
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in normal and b in normal:
                merges.append((-score[piece], vocab[piece], vocab[a], a, b))
    merges.sort()
    return vocab, [(a, b) for *_, a, b in merges]


def build_fast_tokenizer(model_file: str | Path):
    """A `tokenizers.Tokenizer` equal to the sentencepiece model `model_file` plus a leading <s>."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _bpe(model_file)
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE}+[^{SPACE}]*|[^{SPACE}]+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return tok


def write_hf_tokenizer(model_file: str | Path, folder: str | Path) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder` (the
    sentencepiece `tokenizer.model` itself is copied by the caller). Returns the file names written."""
    folder = Path(folder)
    build_fast_tokenizer(model_file).save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        # the generic fast class loads tokenizer.json as written (a Llama class would rebuild the pipeline)
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "pad_token": None,             # v1 has no pad piece: generation pads with </s> (generation_config.json)
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 32768,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
