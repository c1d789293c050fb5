"""The eight zero-shot tasks: local files in, scoring requests out, with lm-evaluation-harness's prompts.

Every task becomes a list of `Item`s. An item is one question: one (context, continuation)
request per answer choice, the gold choice, and each choice's length in characters (the
acc_norm denominator). The prompts, target delimiters and preprocessing copy the
lm-evaluation-harness (v0.4) task definitions:

  piqa           "Question: {goal}\\nAnswer:" + " " + sol         acc, acc_norm
  arc_easy       "Question: {question}\\nAnswer:" + " " + choice  acc, acc_norm
  arc_challenge  same as arc_easy                                 acc, acc_norm
  boolq          "{passage}\\nQuestion: {question}?\\nAnswer:" + " no"/" yes"   acc
  hellaswag      preprocess("{activity_label}: {ctx_a} {ctx_b.capitalize()}") + " " + preprocess(ending)
  winogrande     partial evaluation: sentence[:blank] + option, continuation " " + sentence[blank+1:].strip()
  lambada        text minus its last word, continuation " " + last word (no delimiter)   acc (greedy), ppl
  openbookqa     "{question_stem}" + " " + choice                  acc, acc_norm

Data files are those described in ../shared/data/README.md, read with `datasets`' json/text
builders. Two of them are not the originals lm-eval reads, see `hellaswag` and `winogrande`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from asft_ray.data import HUB, resolve_data_dir
from asft_ray.errors import AsftError


@dataclass(frozen=True)
class Item:
    """One question: a (context, continuation) request per choice, the gold index, choice lengths."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    lengths: tuple[int, ...]


def multiple_choice(context: str, choices: list[str], gold: int, delimiter: str = " ") -> Item:
    """lm-eval's multiple_choice output type: the same context, one continuation per choice."""
    if not 0 <= gold < len(choices):
        raise AsftError(f"gold index {gold} outside {len(choices)} choices for context {context[:60]!r}")
    return Item(tuple((context, delimiter + c) for c in choices), gold, tuple(len(c) for c in choices))


# --- file readers (datasets' local builders) ------------------------------------------------


def _json_rows(path: str) -> list[dict]:
    from datasets import load_dataset

    return list(load_dataset("json", data_files={"test": path}, split="test"))


def _text_lines(path: str) -> list[str]:
    from datasets import load_dataset

    return list(load_dataset("text", data_files={"test": path}, split="test")["text"])


# --- tasks ----------------------------------------------------------------------------------


def piqa(files: dict[str, str]) -> list[Item]:
    rows = _json_rows(files["items"])
    labels = [int(x) for x in _text_lines(files["labels"]) if x.strip()]
    if len(labels) != len(rows):
        raise AsftError(f"piqa: {len(rows)} items but {len(labels)} labels")
    return [multiple_choice(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], y) for r, y in zip(rows, labels)]


def arc(files: dict[str, str]) -> list[Item]:
    items = []
    for r in _json_rows(files["items"]):
        labels = r["choices"]["label"]
        items.append(multiple_choice(f"Question: {r['question']}\nAnswer:", r["choices"]["text"], labels.index(r["answerKey"])))
    return items


def _truth(label) -> int:
    """BoolQ labels: SuperGLUE's jsonl writes "true"/"false" strings; HF has 0/1 or bools."""
    text = str(label).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise AsftError(f"boolq: unreadable label {label!r}")
    return int(text in ("true", "1"))


def boolq(files: dict[str, str]) -> list[Item]:
    return [
        multiple_choice(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], _truth(r["label"]))
        for r in _json_rows(files["items"])
    ]


def openbookqa(files: dict[str, str]) -> list[Item]:
    items = []
    for r in _json_rows(files["items"]):
        q = r["question"]
        labels = [c["label"] for c in q["choices"]]
        items.append(multiple_choice(q["stem"], [c["text"] for c in q["choices"]], labels.index(r["answerKey"].lstrip())))
    return items


def winogrande(files: dict[str, str]) -> list[Item]:
    """lm-eval's partial evaluation: the option fills the blank inside the context and every
    option scores the same continuation (the text after the blank, stripped, after " ").

    The local file is llm-foundry's conversion, whose `context_options` are exactly
    sentence[:blank] + option and whose `continuation` is sentence[blank+1:].strip()."""
    items = []
    for r in _json_rows(files["items"]):
        options = list(r["context_options"])
        target = " " + r["continuation"]
        items.append(Item(tuple((ctx, target) for ctx in options), int(r["gold"]), tuple(len(target) for _ in options)))
    return items


def lambada(files: dict[str, str]) -> list[Item]:
    """lambada_openai: the context is the text without its last space-separated word; the
    continuation is " " + that word, with no extra delimiter."""
    items = []
    for r in _json_rows(files["items"]):
        words = r["text"].split(" ")
        target = " " + words[-1]
        items.append(Item(((" ".join(words[:-1]), target),), 0, (len(target),)))
    return items


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip, WikiHow's ` [title]` to `. `, drop other
    bracket markers, squeeze double spaces (one pass, as lm-eval does)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_query(line: str) -> str:
    """Rebuild lm-eval's query from llama.cpp's `activity_label: ctx` line.

    That file keeps the dataset's `ctx` = ctx_a + " " + ctx_b with ctx_b lower-case as
    released; lm-eval capitalizes ctx_b. The split point is not stored, so ctx_b is taken to
    be the text after the last ". " when it starts with a lower-case letter (the ActivityNet
    layout); otherwise the line is used as is."""
    label, _, ctx = line.partition(": ")
    head, sep, tail = ctx.rpartition(". ")
    if not sep and ctx[:1].islower():
        ctx = ctx.capitalize()
    elif sep and tail[:1].islower():
        ctx = head + sep + tail.capitalize()
    return hellaswag_preprocess(f"{label}: {ctx}")


def hellaswag(files: dict[str, str]) -> list[Item]:
    """llama.cpp's text layout: 6 lines per item (`activity_label: ctx`, gold 0-3, 4 endings)."""
    lines = _text_lines(files["items"])
    if len(lines) % 6:
        raise AsftError(f"hellaswag: {files['items']} has {len(lines)} lines, not a multiple of 6")
    items = []
    for i in range(0, len(lines), 6):
        endings = [hellaswag_preprocess(e) for e in lines[i + 2 : i + 6]]
        items.append(multiple_choice(hellaswag_query(lines[i]), endings, int(lines[i + 1])))
    return items


# name -> (reader, {role: file under the data dir}, metrics)
TASKS = {
    "piqa": (piqa, {"items": "eval/piqa/valid.jsonl", "labels": "eval/piqa/valid-labels.lst"}, ("acc", "acc_norm")),
    "arc_easy": (arc, {"items": "eval/arc_easy/ARC-Easy-test.jsonl"}, ("acc", "acc_norm")),
    "arc_challenge": (arc, {"items": "eval/arc_challenge/ARC-Challenge-test.jsonl"}, ("acc", "acc_norm")),
    "boolq": (boolq, {"items": "eval/boolq/val.jsonl"}, ("acc",)),
    "hellaswag": (hellaswag, {"items": "eval/hellaswag/hellaswag_val_full.txt.bz2"}, ("acc", "acc_norm")),
    "winogrande": (winogrande, {"items": "eval/winogrande/dev.llm-foundry.jsonl"}, ("acc",)),
    "lambada": (lambada, {"items": "eval/lambada/lambada_test.jsonl"}, ("acc", "ppl")),
    "openbookqa": (openbookqa, {"items": "eval/openbookqa/test.jsonl"}, ("acc", "acc_norm")),
}
ALL_TASKS = tuple(TASKS)


def parse_tasks(spec: str) -> list[str]:
    """`zeroshot` = all eight; otherwise a comma list of task names."""
    if spec.strip() == "zeroshot":
        return list(ALL_TASKS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise AsftError(f"unknown task(s) {', '.join(unknown) or repr(spec)}: use zeroshot or any of {', '.join(ALL_TASKS)}")
    return names


def task_metrics(name: str) -> tuple[str, ...]:
    return TASKS[name][2]


def load_task(name: str, data_dir: str | None = None, limit: int | None = None) -> list[Item]:
    """The task's items from the local data dir, in file order; the first `limit` when given."""
    if name not in TASKS:
        parse_tasks(name)
    if limit is not None and limit < 1:
        raise AsftError(f"--limit must be at least 1, got {limit}")
    reader, relative, _ = TASKS[name]
    folder = resolve_data_dir(data_dir)
    if folder == HUB:
        raise AsftError(f"zero-shot task {name} reads local files only; set --data-dir to a folder with eval/")
    files = {}
    for role, rel in relative.items():
        path = Path(folder) / rel
        if not path.is_file():
            raise AsftError(f"data file {path} for task {name} is missing (data dir {folder})")
        files[role] = str(path)
    items = reader(files)
    return items[:limit] if limit is not None else items
