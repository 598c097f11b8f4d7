"""MT-Bench (Zheng et al. 2023) the way FastChat's llm_judge runs it, with our own inference.

    python eval/mt_bench.py model_path=outputs/sft/hf model_id=my-mixtral output_dir=outputs/mt_bench \
        questions=../shared/data/mt_bench/question.jsonl \
        judge.base_url=https://api.openai.com/v1 judge.model=gpt-4   # key from $OPENAI_API_KEY

1. Answers: two turns per question, turn 2 conditioned on the model's own turn-1 answer, FastChat's
   per-category temperatures (writing/roleplay 0.7, stem/humanities 0.1, the rest greedy), written to
   `model_answer/<model_id>.jsonl` in FastChat's schema.
2. Judgment (when `judge.base_url` is set): FastChat's single-answer prompts from judge_prompts.jsonl —
   single-v1 / single-v1-multi-turn, and single-math-v1(-multi-turn) with the GPT-4 reference answers
   for math, reasoning and coding — sent to any OpenAI-compatible chat-completions endpoint
   (temperature 0, max_tokens 2048, retries with backoff). The rating is parsed as [[x]], then [x],
   else -1; -1s are counted and reported and left out of the means (as FastChat's show_result does).
   Written to `model_judgment/<judge>_single.jsonl` in FastChat's schema.
3. Scores per turn, overall and per category: `scores.md`, `scores.json`, `mt_bench.png`.
Rerunning skips what is already answered or judged.

Over 250 lines because the three steps above are the benchmark's one protocol (FastChat's), kept in the order it runs.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from eval.config import MTBenchConfig, validate_eval
from train import cli, console

TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
NEED_REF = ("math", "reasoning", "coding", "arena-hard-200")
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: malformed JSON ({e.msg})") from None
    return out


def append_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    qs = read_jsonl(path)
    if not qs:
        raise FileNotFoundError(f"no questions in {path} (FastChat question.jsonl expected)")
    for q in qs:
        if not {"question_id", "category", "turns"} <= set(q):
            raise ValueError(f"{path}: question {q.get('question_id')} lacks question_id/category/turns")
    return qs[:limit] if limit else qs


# ----------------------------------------------------------------------------- answers

def generate_answers(model, tokenizer, questions: list[dict], model_id: str, answer_file: Path,
                     max_new_tokens: int = 1024, batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[dict]:
    """Answer every question not yet in `answer_file`; returns all answers for `questions`."""
    from data.chat import encode_prompt
    from eval.generate import generate

    done = {a["question_id"] for a in read_jsonl(answer_file)}
    todo = [q for q in questions if q["question_id"] not in done]
    by_temp: dict[float, list[dict]] = {}
    for q in todo:
        by_temp.setdefault(TEMPERATURE.get(q["category"], 0.7), []).append(q)
    for temp, qs in sorted(by_temp.items()):
        convs = [[] for _ in qs]
        answers = [[] for _ in qs]
        for turn in range(max(len(q["turns"]) for q in qs)):
            active = [i for i, q in enumerate(qs) if turn < len(q["turns"])]
            for i in active:
                convs[i].append({"role": "user", "content": qs[i]["turns"][turn]})
            outs = generate(model, tokenizer, [encode_prompt(convs[i], tokenizer) for i in active], max_new_tokens,
                            temp, batch_size, seed + turn, progress, desc=f"mt-bench turn {turn + 1} (T={temp})")
            for i, ids in zip(active, outs):
                text = tokenizer.decode(ids).strip() or "(empty)"  # an empty turn would break the next [INST]
                answers[i].append(text)
                convs[i].append({"role": "assistant", "content": text})
        append_jsonl(answer_file, [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22],
                                    "model_id": model_id, "choices": [{"index": 0, "turns": answers[i]}],
                                    "tstamp": time.time()} for i, q in enumerate(qs)])
    wanted = {q["question_id"] for q in questions}
    return [a for a in read_jsonl(answer_file) if a["question_id"] in wanted]


# ----------------------------------------------------------------------------- judge

class JudgeError(RuntimeError):
    """The judge endpoint cannot judge: unreachable, refusing, or no request fits its context (one line)."""


def _post(base_url: str, body: dict, api_key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _too_long(code: int, text: str) -> bool:
    """A 400 that says prompt + max_tokens exceed the judge's context (this project's server and OpenAI:
    code context_length_exceeded; vLLM: "maximum context length")."""
    return code == 400 and ("context_length_exceeded" in text or "maximum context length" in text)


def chat_completion(base_url: str, model: str, messages: list[dict], max_tokens: int, temperature: float,
                    api_key: str | None, retries: int = 5, timeout: float = 120.0) -> str:
    """POST {base_url}/chat/completions (OpenAI schema); returns the content. Server errors and timeouts are
    retried with exponential backoff; a request too long for the judge's context is retried asking for half as
    many tokens (down to 16); any other client error, or the last failure, is a JudgeError (one line)."""
    delay, last, attempt = 1.0, None, 0
    while True:
        try:
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, "n": 1}
            return _post(base_url, body, api_key, timeout)["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            text = e.read()[:300].decode(errors="replace")
            last = f"HTTP {e.code}: {text}"
            if _too_long(e.code, text) and max_tokens > 16:
                max_tokens = max(16, max_tokens // 2)  # ask for what fits (not an attempt)
                continue
            if e.code < 500 and e.code != 429:
                break  # a client error will not fix itself
        except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, json.JSONDecodeError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        attempt += 1
        if attempt > retries:
            break
        time.sleep(delay)
        delay = min(delay * 2, 60.0)
    raise JudgeError(f"judge endpoint {base_url} failed: {last}")


def judge_context(base_url: str, model: str, api_key: str | None, timeout: float = 10.0) -> int | None:
    """The judge model's context in tokens when its endpoint says (`max_model_len` in GET /models: this project's
    server, vLLM); None when it does not. An endpoint that does not answer at all is a JudgeError."""
    req = urllib.request.Request(base_url.rstrip("/") + "/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            listed = json.loads(resp.read()).get("data", [])
    except urllib.error.HTTPError:
        return None  # it answers, but not this (some endpoints list no models)
    except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
        raise JudgeError(f"judge endpoint {base_url} cannot be reached ({getattr(e, 'reason', e)})") from None
    return next((int(m["max_model_len"]) for m in listed if m.get("id") == model and m.get("max_model_len")), None)


def parse_rating(judgment: str) -> float:
    m = RATING.search(judgment) or RATING_BACKUP.search(judgment)
    return float(m.group(1)) if m else -1.0


def judge_prompt(q: dict, answer_turns: list[str], turn: int, prompts: dict, refs: dict) -> tuple[str, dict, str]:
    """(prompt name, judge prompt entry, user prompt) for one question and turn (1 or 2)."""
    math = q["category"] in NEED_REF
    name = ("single-math-v1" if math else "single-v1") + ("-multi-turn" if turn == 2 else "")
    entry = prompts[name]
    fields = {}
    if turn == 1:
        fields.update(question=q["turns"][0], answer=answer_turns[0])
    else:
        fields.update(question_1=q["turns"][0], question_2=q["turns"][1], answer_1=answer_turns[0], answer_2=answer_turns[1])
    if math:
        ref = refs.get(q["question_id"])
        if ref is None:
            raise ValueError(f"question {q['question_id']} ({q['category']}) needs a reference answer")
        fields.update(ref_answer_1=ref[0], ref_answer_2=ref[1] if len(ref) > 1 else "")
    return name, entry, entry["prompt_template"].format(**fields)


def judge_answers(questions: list[dict], answers: list[dict], model_id: str, judgment_file: Path, judge_cfg,
                  prompts: dict, refs: dict, progress: bool = True) -> list[dict]:
    """Judge every (question, turn) of `model_id` not yet in `judgment_file`."""
    from train.console import progress as progress_lines

    api_key = os.environ.get(judge_cfg.api_key_env) if judge_cfg.api_key_env else None
    max_tokens = judge_cfg.max_tokens
    context = judge_context(judge_cfg.base_url, judge_cfg.model, api_key)
    if context is not None and max_tokens > context // 4:  # leave the judge prompt room (up to 3/4 of the context)
        max_tokens = max(16, context // 4)
        print(f"judge: {judge_cfg.model} has a context of {context} tokens: asking for at most {max_tokens} tokens "
              f"per judgment (judge.max_tokens={judge_cfg.max_tokens} would not leave the prompt room)", flush=True)
    done = {(j["question_id"], j["turn"]) for j in read_jsonl(judgment_file) if j["model"] == model_id}
    by_q = {a["question_id"]: a["choices"][0]["turns"] for a in answers}
    jobs = [(q, t) for q in questions if q["question_id"] in by_q for t in (1, 2)
            if t <= len(q["turns"]) and (q["question_id"], t) not in done]

    def run(job):
        q, turn = job
        name, entry, user = judge_prompt(q, by_q[q["question_id"]], turn, prompts, refs)
        messages = ([{"role": "system", "content": entry["system_prompt"]}] if entry.get("system_prompt") else [])
        messages.append({"role": "user", "content": user})
        judgment = chat_completion(judge_cfg.base_url, judge_cfg.model, messages, max_tokens,
                                   judge_cfg.temperature, api_key, judge_cfg.retries, judge_cfg.timeout_s)
        return {"question_id": q["question_id"], "model": model_id, "judge": [judge_cfg.model, name],
                "user_prompt": user, "judgment": judgment, "score": parse_rating(judgment), "turn": turn,
                "tstamp": time.time()}

    with ThreadPoolExecutor(max_workers=max(1, judge_cfg.concurrency)) as pool:
        for row in progress_lines(pool.map(run, jobs), "judge", total=len(jobs), enabled=progress):
            append_jsonl(judgment_file, [row])  # one line at a time: a crash loses nothing judged
    return [j for j in read_jsonl(judgment_file) if j["model"] == model_id]


# ----------------------------------------------------------------------------- scores

def scores(judgments: list[dict], questions: list[dict]) -> dict:
    """FastChat show_result (single): means over ratings != -1, per turn, overall, and per category."""
    cat = {q["question_id"]: q["category"] for q in questions}
    valid = [j for j in judgments if j["score"] != -1]

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    per_cat: dict[str, list[float]] = {}
    for j in valid:
        per_cat.setdefault(cat.get(j["question_id"], "?"), []).append(j["score"])
    return {
        "turn_1": mean([j["score"] for j in valid if j["turn"] == 1]),
        "turn_2": mean([j["score"] for j in valid if j["turn"] == 2]),
        "overall": mean([j["score"] for j in valid]),
        "categories": {c: mean(v) for c, v in sorted(per_cat.items())},
        "judged": len(judgments), "unparsable": len(judgments) - len(valid),
    }


def write_report(result: dict, model_id: str, out: Path) -> str:
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [f"# MT-Bench: {model_id}", "", "| turn 1 | turn 2 | overall | judged | unparsable (-1) |", "|---|---|---|---|---|",
             f"| {fmt(result['turn_1'])} | {fmt(result['turn_2'])} | {fmt(result['overall'])} | {result['judged']} | {result['unparsable']} |",
             "", "| category | score |", "|---|---|"]
    lines += [f"| {c} | {fmt(s)} |" for c, s in result["categories"].items()]
    text = "\n".join(lines) + "\n"
    (out / "scores.md").write_text(text)
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(result["categories"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(cats, [result["categories"][c] or 0 for c in cats], color="tab:blue")
    ax.set_ylim(0, 10)
    ax.set_ylabel("score (1-10)")
    ax.set_title(f"MT-Bench per category: {model_id} (overall {fmt(result['overall'])})")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "mt_bench.png", dpi=100)
    plt.close(fig)
    return text


def run(cfg, model=None, tokenizer=None, progress: bool = True) -> dict:
    out = Path(cfg.output_dir)
    qpath = Path(cfg.questions)
    questions = load_questions(qpath, cfg.limit)
    if model is None:
        from eval.generate import load

        model, tokenizer = load(cfg.model_path, cfg.dtype)
    answers = generate_answers(model, tokenizer, questions, cfg.model_id, out / "model_answer" / f"{cfg.model_id}.jsonl",
                               cfg.max_new_tokens, cfg.batch_size, cfg.seed, progress)
    summary = {"answers": len(answers)}
    if cfg.judge.base_url:
        prompts = {p["name"]: p for p in read_jsonl(cfg.judge_prompts or qpath.parent / "judge_prompts.jsonl")}
        ref_rows = read_jsonl(cfg.reference_answers or qpath.parent / "reference_answer" / "gpt-4.jsonl")
        refs = {r["question_id"]: r["choices"][0]["turns"] for r in ref_rows}
        judge_name = cfg.judge.model.replace("/", "_")
        judgments = judge_answers(questions, answers, cfg.model_id, out / "model_judgment" / f"{judge_name}_single.jsonl",
                                  cfg.judge, prompts, refs, progress)
        summary.update(scores(judgments, questions))
        summary["table"] = write_report(summary, cfg.model_id, out)
    return summary


@cli.main("mt_bench", MTBenchConfig, validate_eval)
def main(cfg) -> None:
    try:
        summary = run(cfg)
    except JudgeError as e:  # the answers (and every judgment made) are on disk; a rerun judges the rest
        print(f"mt_bench: {e}; the answers are kept in {cfg.output_dir}/model_answer/{cfg.model_id}.jsonl and a rerun "
              f"judges what is left", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"answers: {summary['answers']} in {cfg.output_dir}/model_answer/{cfg.model_id}.jsonl")
    if "table" in summary:
        print(summary["table"])
        if summary["unparsable"]:
            print(f"warning: {summary['unparsable']} judgments had no parsable rating ([[x]] or [x]) and are left out")
    else:
        print("no judge configured (judge.base_url): answers only")
    out = Path(cfg.output_dir)
    results = [f"{summary['answers']} answers" + (f"; {summary['unparsable']} judgments unparsable" if summary.get("unparsable") else "")]
    console.summary("mt_bench", time.time() - console.STARTED, results,
                    [out / "model_answer" / f"{cfg.model_id}.jsonl", *sorted((out / "model_judgment").glob("*.jsonl")),
                     *sorted(out.glob("*.md")), *sorted(out.glob("*.json"))])


if __name__ == "__main__":
    main()
