"""The project's tokenizers and chat schemes (v1 and v3) as Hugging Face tokenizer files, for exports.

`write_hf_tokenizer(model_file, folder)` writes `tokenizer.json` (fast), `tokenizer_config.json` (with the
chat template of the file's version) and `special_tokens_map.json` such that, in transformers 4 and 5, vLLM and TGI:

    AutoTokenizer(folder)(text).input_ids                  == [BOS] + sentencepiece(text)
    AutoTokenizer(folder).apply_chat_template(msgs, tools) == data.chat.encode_chat / encode_prompt(msgs, ..., tools)
                                                           == mistral_common's InstructTokenizerV1 / V3

(tests/unit/test_hf_tokenizer.py checks both versions on the real chats of ../shared/data and generated ones).

The tokenizer.json reproduces sentencepiece's BPE exactly rather than the usual Llama conversion, which
differs on runs of spaces ("  two" → sentencepiece [▁▁, ▁two]; a Metaspace pre-tokenizer splits at every ▁):

    normalizer      "▁" + text with " " → "▁"   (sentencepiece's dummy prefix and escaping; identity otherwise)
    pre-tokenizer   words = a run of ▁ with the non-▁ characters after it   (sentencepiece's SplitIntoWords
                    with whitespace-only pieces allowed)
    model           BPE over the sentencepiece vocabulary; the merge a+b ranks by the score of the piece a+b
                    (sentencepiece merges the pair whose result scores highest); unknown characters fall
                    back to <0xXX> byte pieces
    added tokens    <unk> and every control piece (v1: <s> </s>; v3 also [INST] ... [/TOOL_RESULTS], [IMG], ...):
                    the text between two of them is normalized on its own, so it gets the dummy-prefix "▁"
                    exactly as mistral_common's separate encoding of each piece of text does
    post-processor  <s> before the text

What no HF tokenizer can do: tell a control-token string typed inside a message ("</s>", v3's "[INST]") from
the template's own control tokens. data/chat.py and the server encode such text as text, as mistral_common
does; the export's template reads it as control tokens (docs/export.md). With `split_special_tokens=True`
plain text keeps them as text.
"""

from __future__ import annotations

import json
from pathlib import Path

SPACE = "\u2581"

# Jinja (transformers' sandbox) for both versions: first mistral_common's normalization (data/chat.py
# `normalize`), then v1's or v3's scheme. JSON that the template cannot parse (a tool call's arguments or a tool
# result given as a string) is emitted as written when it looks like JSON ({..}, [..], a number, true, false,
# null) and as a JSON string otherwise: equal to mistral_common when the JSON is written as json.dumps writes it.
_NORMALIZE = (
    "{%- set ns = namespace(system='', turns=[], prev='', first=-1, last=-1) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- if m['content'] -%}{%- set ns.system = ns.system ~ ('\\n\\n' if ns.system else '') ~ m['content'] -%}{%- endif -%}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- set ns.turns = ns.turns + [{'role': 'tool', 'content': m['content'], 'calls': [], 'id': m['tool_call_id']}] -%}"
    "{%- else -%}"
    "{%- set text = m['content'] if m['content'] else '' -%}"
    "{%- set calls = m['tool_calls'] if m['tool_calls'] else [] -%}"
    "{%- if ns.prev == m['role'] -%}"
    "{%- set before = ns.turns[-1] -%}"
    "{%- set ns.turns = ns.turns[:-1] + [{'role': m['role'], 'content': before['content'] ~ ('\\n\\n' if before['content'] "
    "and text else '') ~ text, 'calls': before['calls'] + calls}] -%}"
    "{%- else -%}{%- set ns.turns = ns.turns + [{'role': m['role'], 'content': text, 'calls': calls}] -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- set ns.prev = m['role'] -%}"
    "{%- endfor -%}"
    "{%- if not ns.turns or ns.turns[0]['role'] != 'user' -%}"
    "{%- set ns.turns = [{'role': 'user', 'content': '', 'calls': []}] + ns.turns -%}{%- endif -%}"
    "{%- for t in ns.turns -%}{%- if t['role'] == 'user' -%}"
    "{%- if ns.first < 0 -%}{%- set ns.first = loop.index0 -%}{%- endif -%}{%- set ns.last = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
)
_JSON = (
    "{%- macro json_text(x) -%}"
    "{%- if x is not string -%}{{- x | tojson -}}"
    "{%- elif x == '' -%}{{- '{}' -}}"
    "{%- elif x[:1] in ['{', '['] or x in ['true', 'false', 'null'] or (x | int | string) == x "
    "or (x | float | string) == x -%}{{- x -}}"
    "{%- else -%}{{- x | tojson -}}{%- endif -%}"
    "{%- endmacro -%}"
)
V1_TEMPLATE = _NORMALIZE + (
    "{%- if tools or ns.turns | selectattr('role', 'equalto', 'tool') | list -%}"
    "{{- raise_exception('tools need a v3 tokenizer (Mixtral-8x22B); the v1 tokenizer has no tool tokens') -}}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for t in ns.turns -%}"
    "{%- if t['role'] == 'user' -%}"
    "{{- (' ' if not loop.first and ns.turns[loop.index0 - 1]['role'] == 'user' else '') ~ '[INST] ' -}}"
    "{{- (ns.system ~ '\\n\\n' if loop.index0 == ns.first and ns.system else '') ~ t['content'] ~ ' [/INST]' -}}"
    "{%- elif t['calls'] -%}"
    "{{- raise_exception('tool calls need a v3 tokenizer (Mixtral-8x22B); the v1 tokenizer has no tool tokens') -}}"
    "{%- else -%}{{- ' ' ~ t['content'] ~ eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)
V3_TEMPLATE = _JSON + _NORMALIZE + (
    "{{- bos_token -}}"
    "{%- for t in ns.turns -%}"
    "{%- if t['role'] == 'user' -%}"
    "{%- if tools and loop.index0 == ns.last -%}"
    "{%- set ts = namespace(items=[]) -%}"
    "{%- for tool in tools -%}{%- set f = tool['function'] if tool['function'] is defined else tool -%}"
    "{%- set ts.items = ts.items + [{'type': 'function', 'function': {'name': f['name'], "
    "'description': f['description'] if f['description'] else '', 'parameters': f['parameters'] if f['parameters'] "
    "else {}}}] -%}{%- endfor -%}"
    "{{- '[AVAILABLE_TOOLS]' ~ (ts.items | tojson) ~ '[/AVAILABLE_TOOLS]' -}}"
    "{%- endif -%}"
    "{{- '[INST]' ~ (ns.system ~ '\\n\\n' if loop.index0 == ns.last and ns.system else '') ~ t['content'] ~ '[/INST]' -}}"
    "{%- elif t['role'] == 'tool' -%}"
    "{{- '[TOOL_RESULTS]{\"content\": ' ~ json_text(t['content']) ~ ', \"call_id\": ' ~ (t['id'] | tojson) ~ '}[/TOOL_RESULTS]' -}}"
    "{%- elif t['calls'] -%}"
    "{{- '[TOOL_CALLS][' -}}"
    "{%- for c in t['calls'] -%}{%- set f = c['function'] if c['function'] is defined else c -%}"
    "{{- ', ' if not loop.first else '' -}}"
    "{{- '{\"name\": ' ~ (f['name'] | tojson) ~ ', \"arguments\": ' ~ json_text(f['arguments']) -}}"
    "{{- (', \"id\": ' ~ (c['id'] | tojson)) if c['id'] and c['id'] != 'null' else '' -}}{{- '}' -}}"
    "{%- endfor -%}"
    "{{- ']' ~ eos_token -}}"
    "{%- else -%}{{- t['content'].rstrip(' ') ~ eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


def chat_template(version: str) -> str:
    """The export's chat template for a tokenizer version ("v1" or "v3")."""
    return {"v1": V1_TEMPLATE, "v3": V3_TEMPLATE}[version]


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
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", *_controls(model_file)]])
    return tok


def _controls(model_file: str | Path) -> list[str]:
    """The control pieces (v1: <s> </s>; v3 also [INST] ... [/TOOL_RESULTS], [IMG], [control_N]), in id order."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return [p.piece for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.CONTROL]


def write_hf_tokenizer(model_file: str | Path, folder: str | Path) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder` (the
    sentencepiece `tokenizer.model` itself is copied by the caller). Returns the file names written."""
    from data.tokenizer import Tokenizer

    folder = Path(folder)
    version = Tokenizer(model_file).version
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
        "chat_template": chat_template(version),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
