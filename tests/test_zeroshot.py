"""Zero-shot scoring: lm-eval's log-likelihood rules checked against hand computation, and the eight loaders."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from asft_ray.errors import AsftError
from asft_ray.eval.zeroshot import encode_pair, evaluate_task, loglikelihoods, score_items
from asft_ray.eval.zeroshot_tasks import ALL_TASKS, Item, hellaswag_query, load_task, multiple_choice, parse_tasks

VOCAB = 128


class CharTokenizer:
    """One token per ASCII character; no special tokens."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


# Bigram probabilities p(next | previous); every other next token shares the leftover mass.
BIGRAM = {
    ":": {" ": 0.5},
    " ": {"a": 0.25, "b": 0.25},
    "a": {"b": 0.5},
    "b": {"b": 0.125},
}


def bigram_logprob(prev: str, nxt: str) -> float:
    row = BIGRAM.get(prev, {})
    if nxt in row:
        return math.log(row[nxt])
    return math.log((1 - sum(row.values())) / (VOCAB - len(row)))


class BigramLM(nn.Module):
    """A causal LM whose next-token distribution depends only on the current token."""

    def __init__(self):
        super().__init__()
        table = torch.empty(VOCAB, VOCAB, dtype=torch.float64)
        for p in range(VOCAB):
            for n in range(VOCAB):
                table[p, n] = bigram_logprob(chr(p), chr(n))
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=False):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, logits_to_keep])


def hand(context: str, continuation: str) -> float:
    """Sum of bigram log-probs of the continuation; lm-eval scores a context's trailing spaces as continuation."""
    stripped = context.rstrip()
    context, text = stripped, context + continuation
    return sum(bigram_logprob(text[i - 1], text[i]) for i in range(len(context), len(text)))


def test_loglikelihood_matches_hand_computation():
    # the last two have one-token continuations of one context: they share a forward pass
    requests = [("Q:", " a"), ("Q:", " bb"), ("Q: ", "ab"), ("xyz:", " b"), ("Q:", "a"), ("Q:", " ")]
    got = loglikelihoods(BigramLM(), CharTokenizer(), requests, batch_size=3)
    for (ctx, cont), (ll, _) in zip(requests, got):
        assert ll == pytest.approx(hand(ctx, cont), abs=1e-5)
    # by hand: log p(' '|':') + log p('a'|' ') = log 0.5 + log 0.25
    assert got[0][0] == pytest.approx(math.log(0.5) + math.log(0.25), abs=1e-5)
    # the context's trailing space moves into the continuation (lm-eval's _encode_pair)
    assert got[2][0] == pytest.approx(got[0][0] + math.log(0.5), abs=1e-5)
    # greedy: after ':' the argmax is ' ', after ' ' the tie between 'a' and 'b' goes to 'a'
    assert [g for _, g in got] == [True, False, True, False, False, True]
    assert got[5][0] == pytest.approx(math.log(0.5), abs=1e-6)


def test_acc_and_acc_norm_differ_on_a_two_item_set():
    # " b" = log .5 + log .25 = -2.079 beats " ab" = -2.079 + log .5 = -2.773 on the sum (acc picks "b"),
    # but per character -2.079 / 1 < -2.773 / 2 = -1.386 (acc_norm picks "ab").
    items = [
        multiple_choice("Q:", ["b", "ab"], gold=1),   # acc wrong (picks "b"), acc_norm right
        multiple_choice("Q:", ["a", "xyz"], gold=0),  # both right
    ]
    result = score_items(BigramLM(), CharTokenizer(), items, ("acc", "acc_norm"), batch_size=2)
    assert result == {"n": 2, "acc": 0.5, "acc_norm": 1.0}


def test_lambada_metrics_are_greedy_accuracy_and_perplexity():
    items = [Item((("Q:", " a"),), 0, (2,)), Item((("Q:", " ab"),), 0, (3,))]
    result = score_items(BigramLM(), CharTokenizer(), items, ("acc", "ppl"))
    lls = [hand("Q:", " a"), hand("Q:", " ab")]
    assert result["acc"] == 1.0  # ' ' then 'a' (tie broken to the lower id) then 'b' are all argmax
    assert result["ppl"] == pytest.approx(math.exp(-sum(lls) / 2), rel=1e-5)


def test_batched_scores_equal_direct_full_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    requests = [("The cat sat on the", " mat"), ("In 1999 the", " team won the cup"), ("A", " b c d e f g h")]
    batched = loglikelihoods(model, tok, requests, batch_size=3)
    for (ctx, cont), (ll, _) in zip(requests, batched):
        c, x = encode_pair(tok, ctx, cont)
        ids = torch.tensor([c + x])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        direct = float(lp[len(c) - 1 :].gather(1, torch.tensor(x)[:, None]).sum())
        assert ll == pytest.approx(direct, abs=1e-4)
    single = loglikelihoods(model, tok, requests, batch_size=1)
    assert [a for a, _ in single] == pytest.approx([a for a, _ in batched], abs=1e-4)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_each_local_task_parses(name, data_dir):
    items = load_task(name, data_dir, limit=2)
    assert len(items) == 2
    for it in items:
        assert len(it.requests) >= 1 and 0 <= it.gold < len(it.requests)
        assert all(ctx and cont for ctx, cont in it.requests)
    first = items[0]
    expected_first = {
        "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", 2, 0),
        "arc_easy": ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
                     "\nAnswer:", 4, 0),
        "arc_challenge": ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
                          "Which is the most likely effect of this increase in rotation?\nAnswer:", 4, 2),
        "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", 4, 3),
        "winogrande": ("Sarah was a much better surgeon than Maria so Sarah", 2, 1),
        "openbookqa": ("A person wants to start saving money so that they can afford a nice vacation at the end of "
                       "the year. After looking over their budget and expenses, they decide the best way to save "
                       "money is to", 4, 1),
    }
    if name in expected_first:
        ctx, n_choices, gold = expected_first[name]
        assert (first.requests[0][0], len(first.requests), first.gold) == (ctx, n_choices, gold)
    if name == "boolq":
        assert first.requests[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
        assert [c for _, c in first.requests] == [" no", " yes"]
        assert [it.gold for it in items] == [0, 1]  # the file's labels are the strings "false", "true"
    if name == "winogrande":
        assert first.requests[1] == ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")
    if name == "lambada":
        (ctx, cont), = first.requests
        assert cont == " signs" and ctx.endswith("I don't care about")
    if name == "piqa":
        assert first.requests[0][1].startswith(" Provide the guinea pig") and first.lengths[0] == len(first.requests[0][1]) - 1


def test_hellaswag_query_rebuilds_lm_eval_capitalization():
    assert hellaswag_query("Clean and jerk: A lady walks. She grabs the pole. the lady") == \
        "Clean and jerk: A lady walks. She grabs the pole. The lady"
    assert hellaswag_query("Health: How to rest. Drink water.") == "Health: How to rest. Drink water."


def test_parse_tasks_and_bad_names():
    assert parse_tasks("zeroshot") == list(ALL_TASKS)
    assert parse_tasks("piqa, boolq") == ["piqa", "boolq"]
    with pytest.raises(AsftError, match="unknown task"):
        parse_tasks("piqa,mmlu")
    with pytest.raises(AsftError, match="limit"):
        load_task("piqa", None, limit=0)


def test_evaluate_task_and_cli(tiny_model_dir, data_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_ray.cli import main

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    direct = evaluate_task(model, tok, "arc_easy", data_dir, limit=3, batch_size=4)
    assert direct["n"] == 3 and set(direct) >= {"acc", "acc_norm"}
    code = main(["eval", "--model", str(tiny_model_dir), "--task", "arc_easy,lambada", "--limit", "3",
                 "--data-dir", data_dir, "--no-progress", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"]["arc_easy"]["acc"] == direct["acc"]
    assert out["tasks"]["arc_easy"]["acc_norm"] == direct["acc_norm"]
    assert out["tasks"]["lambada"]["n"] == 3 and out["tasks"]["lambada"]["ppl"] > 1
