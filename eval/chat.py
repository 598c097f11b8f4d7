"""Interactive terminal chat with an HF Mixtral folder, multi-turn, in the [INST] format.

    python eval/chat.py model_path=outputs/sft/hf [system="You are terse."] [temperature=0]

Type a message and press Enter; `/reset` starts over, `/quit` (or Ctrl-D) leaves.
"""

from __future__ import annotations

from eval.config import ChatConfig, validate_eval
from train import cli


@cli.main("chat", ChatConfig, validate_eval)
def main(cfg) -> None:
    from eval.generate import chat_reply, load

    model, tokenizer = load(cfg.model_path, cfg.dtype)
    history = [{"role": "system", "content": cfg.system}] if cfg.system else []
    start = list(history)
    print(f"chatting with {cfg.model_path} (/reset, /quit)")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = list(start)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = chat_reply(model, tokenizer, history, cfg.max_new_tokens, cfg.temperature) or "(empty)"
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}", flush=True)


if __name__ == "__main__":
    main()
