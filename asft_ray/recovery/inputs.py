"""What a recovery run reads before it trains: the student's masks, the models' configs, the token streams.

All of it happens in one Ray task (`read_inputs_on_ray`), in a fresh worker process that exits when it
is done, so that the driver (`asft recover`, often on a small head node) never imports transformers,
`datasets` or a tokenizer and never holds a weight or a token. Measured on a tiny Llama (the driver's
peak RSS does not grow with the model): 565 MiB when the driver did this itself, 813 MiB with
perplexity checks (it tokenized the whole WikiText-2 valid split), 404 MiB now whichever; transformers'
config code alone is ~80 MiB on top of torch and Ray Train. The driver keeps `RunInputs`: a few
numbers and two object refs, which the Ray Train workers resolve.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from asft_ray.data import c4_documents, wikitext2_ids
from asft_ray.errors import AsftError
from asft_ray.models import load_model, model_config, model_skeleton, resolve_model
from asft_ray.recovery.batches import step_starts, token_stream
from asft_ray.recovery.config import RecoverConfig
from asft_ray.recovery.masks import check_mask_entry, check_mask_names, linear_weight_names, require_zeros, student_masks
from asft_ray.recovery.shards import Checkpoint


@dataclass(frozen=True)
class RunInputs:
    """What the driver keeps of the inputs. `stream` and `eval_ids` are object refs (an int32 token
    tensor; WikiText-2 valid ids or None), resolved by the workers."""

    masks: dict  # the mask summary of asft_run.json
    largest_linear: int | None  # weights in the largest decoder linear (sizes ZeRO-3's buffers)
    stream_tokens: int
    stream: object
    eval_ids: object


def read_inputs_on_ray(cfg: RecoverConfig, data_dir: str) -> RunInputs:
    """`read_inputs` in a one-off Ray task; an AsftError raised there is raised here, as one line."""
    import ray

    from asft_ray.distributed.runner import asft_cause

    task = ray.remote(num_cpus=1, max_calls=1, num_returns=3)(read_inputs)
    facts, stream, eval_ids = task.remote(cfg, data_dir)
    try:
        facts = ray.get(facts)
    except ray.exceptions.RayTaskError as err:
        for ref in (stream, eval_ids):  # the same error: read it, or a cluster that outlives this call
            with contextlib.suppress(ray.exceptions.RayTaskError):  # logs it as "unhandled"
                ray.get(ref)
        raise asft_cause(err) from None
    return RunInputs(stream=stream, eval_ids=eval_ids, **facts)


def read_inputs(cfg: RecoverConfig, data_dir: str) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """(facts for RunInputs, the C4 training stream, the WikiText-2 valid ids or None). Checks that the
    teacher fits the student, that the student has masks, and that the text is long enough."""
    config = model_config(cfg.model)
    check_teacher(cfg, config)
    tokenizer, masks = check_student(cfg, config)
    stream, eval_ids = training_tokens(cfg, tokenizer, data_dir)
    facts = {"masks": masks, "largest_linear": largest_linear(config), "stream_tokens": len(stream)}
    return facts, stream, eval_ids


def largest_linear(config) -> int | None:
    """Weights in the model's largest decoder linear (hidden x max(MLP width, hidden)), from its config."""
    hidden = getattr(config, "hidden_size", None)
    return hidden * max(getattr(config, "intermediate_size", None) or hidden, hidden) if hidden else None


def check_teacher(cfg: RecoverConfig, student_config) -> None:
    """Distillation compares logits (and hidden states) position by position: shapes must agree."""
    if not cfg.teacher:
        return
    teacher = model_config(cfg.teacher)
    if teacher.vocab_size != student_config.vocab_size:
        raise AsftError(
            f"teacher {cfg.teacher!r} has vocabulary size {teacher.vocab_size}, the student {student_config.vocab_size}: "
            "distillation needs the same tokenizer"
        )
    if cfg.hidden_weight > 0:
        for key in ("hidden_size", "num_hidden_layers"):
            if getattr(teacher, key) != getattr(student_config, key):
                raise AsftError(f"hidden-state distillation needs the same {key}: teacher {getattr(teacher, key)}, "
                                f"student {getattr(student_config, key)}")


def check_student(cfg: RecoverConfig, config=None):
    """Prove the student's masks exist (zeros, or a matching mask file) without holding the model:
    weights and masks are read one tensor at a time from the safetensors and checked against a
    skeleton on the `meta` device. Returns (tokenizer, mask summary); the workers rebuild the
    same masks. (A GGUF or hub model has no safetensors to stream: it is loaded whole here.)"""
    from transformers import AutoTokenizer

    source = resolve_model(cfg.model)
    if source.gguf_file or source.is_hub:
        model, tokenizer = load_model(cfg.model, "cpu", show_progress=False)
        masks = student_masks(model, cfg.mask_file, cfg.dense)
        return tokenizer, _mask_summary([(m.numel(), int(torch.count_nonzero(m))) for m in masks.values()])
    tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=False)
    skeleton = model_skeleton(config if config is not None else model_config(cfg.model))
    params = dict(skeleton.named_parameters())
    if cfg.dense:
        return tokenizer, _mask_summary([(params[n].numel(), params[n].numel()) for n in linear_weight_names(skeleton)])
    if cfg.mask_file:
        masks = Checkpoint.from_file(cfg.mask_file)
        check_mask_names(cfg.mask_file, masks.names(), params)
        counts = []
        for name in masks.names():
            check_mask_entry(cfg.mask_file, name, masks.dtype(name), masks.shape(name), params[name].shape)
            counts.append((params[name].numel(), int(torch.count_nonzero(masks.read(name)))))
        return tokenizer, _mask_summary(counts)
    weights = Checkpoint.from_folder(source.location)
    counts = []
    for name in linear_weight_names(skeleton):
        counts.append((params[name].numel(), int(torch.count_nonzero(weights.read(name)))))
        weights.close()  # unmapped after each tensor, so this process never holds the model's pages
    require_zeros(any(kept < total for total, kept in counts))
    return tokenizer, _mask_summary(counts)


def _mask_summary(counts: list[tuple[int, int]]) -> dict:
    """From (weights, kept) per masked tensor."""
    total, kept = sum(t for t, _ in counts), sum(k for _, k in counts)
    return {"masked_params": len(counts), "weights": total, "sparsity": 1 - kept / total}


def training_tokens(cfg: RecoverConfig, tokenizer, data_dir: str):
    """(C4 token stream for training, WikiText-2 *valid* ids for the recovery curve or None)."""
    stream = token_stream(c4_documents(data_dir), tokenizer)
    step_starts(cfg.seed, 0, 1, len(stream), cfg.seqlen)  # fails early if the text is too short
    eval_ids = None
    if cfg.eval_every:
        seqlen = cfg.eval_seqlen or cfg.seqlen
        # a copy of the slice: a view would carry the whole split's storage into the object store
        eval_ids = wikitext2_ids(tokenizer, "valid", data_dir).reshape(-1)[: cfg.eval_windows * seqlen].clone()
        if eval_ids.numel() < seqlen:
            raise AsftError(f"WikiText-2 valid has fewer than {seqlen} tokens")
    return stream, eval_ids
