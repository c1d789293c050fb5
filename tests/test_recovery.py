"""Recovery fine-tuning: masks, losses, DeepSpeed config, and real 2-worker Ray Train + ZeRO runs.

The Ray runs use the tiny Llama from conftest pruned by magnitude to 50 %, a few steps of
32-token windows: they test mechanics (masks, resume, export), not quality.
"""

from __future__ import annotations

import gc
import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from asft_ray.errors import AsftError
from asft_ray.models import decoder_layers, prunable_linears, save_model
from asft_ray.recovery.batches import micro_batch, step_starts
from asft_ray.recovery.config import RecoverConfig
from asft_ray.recovery.deepspeed_config import build_plan, warmup_cosine
from asft_ray.recovery.losses import Objective, kd_loss, recovery_loss
from asft_ray.recovery.masks import (
    apply_masks,
    count_masked_nonzeros,
    linear_weight_names,
    PackedMask,
    load_mask_file,
    masks_from_zeros,
    pack_masks,
    register_mask_hooks,
    select_trainable,
    student_masks,
)
from tests.conftest import build_tiny_llama


def magnitude_prune(model, sparsity=0.5):
    """Zero the smallest |w| of every decoder linear (a stand-in for `asft prune`)."""
    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in prunable_linears(layer).values():
                k = int(lin.weight.numel() * sparsity)
                threshold = lin.weight.abs().flatten().kthvalue(k).values
                lin.weight[lin.weight.abs() <= threshold] = 0
    return model


# ---------------------------------------------------------------- pure pieces, no Ray


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    assert float(kd_loss(logits, logits.clone(), temperature=2.0)) == 0.0
    other = logits + 0.5 * torch.randn(2, 5, 11, generator=g)
    assert float(kd_loss(logits, other, temperature=2.0)) > 1e-4
    assert float(kd_loss(logits, other, temperature=1.0)) > 1e-4


def test_recovery_loss_mixes_the_weighted_terms():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    student = type("Out", (), {"logits": torch.randn(2, 6, 11, generator=g)})
    teacher = type("Out", (), {"logits": torch.randn(2, 6, 11, generator=g)})
    total, parts = recovery_loss(Objective(lm_weight=0.5, kd_weight=2.0, temperature=3.0), ids, student, teacher)
    assert set(parts) == {"lm", "kd"}
    assert float(total) == pytest.approx(0.5 * parts["lm"] + 2.0 * parts["kd"], rel=1e-6)


def _train_few_steps(model, masks, hooks: bool):
    """AdamW with weight decay, 2-step gradient accumulation and clipping, 3 optimizer steps."""
    apply_masks(model, masks)
    select_trainable(model, masks, norms=False, biases=False)
    if hooks:
        register_mask_hooks(model, pack_masks(masks))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        for _ in range(2):
            ids = torch.randint(0, 512, (2, 16), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    return opt


def test_gradient_hooks_keep_pruned_weights_and_adam_state_at_zero():
    model = magnitude_prune(build_tiny_llama())
    masks = masks_from_zeros(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in masks}
    opt = _train_few_steps(model, masks, hooks=True)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert count_masked_nonzeros(params[name], mask) == 0, name
        state = opt.state[params[name]]
        assert count_masked_nonzeros(state["exp_avg"], mask) == 0 and count_masked_nonzeros(state["exp_avg_sq"], mask) == 0
        assert not torch.equal(params[name][mask], before[name][mask]), f"{name}: surviving weights did not train"


def test_without_hooks_pruned_weights_come_back():
    """The negative control: the check above does fail when the gradients are not masked."""
    model = magnitude_prune(build_tiny_llama())
    masks = masks_from_zeros(model)
    _train_few_steps(model, masks, hooks=False)
    params = dict(model.named_parameters())
    assert sum(count_masked_nonzeros(params[n], m) for n, m in masks.items()) > 0


def test_masks_cover_decoder_linears_and_only_they_train():
    model = magnitude_prune(build_tiny_llama())
    masks = masks_from_zeros(model)
    assert len(masks) == 2 * 7 and all(name.startswith("model.layers.") for name in masks)
    assert all(0.45 < 1 - m.float().mean() < 0.55 for m in masks.values())
    trainable = select_trainable(model, masks, norms=True, biases=False)
    assert set(masks) < set(trainable) and all("norm" in n for n in set(trainable) - set(masks))
    assert not model.get_input_embeddings().weight.requires_grad


def test_dense_model_has_no_masks():
    with pytest.raises(AsftError, match="no zero weights"):
        masks_from_zeros(build_tiny_llama())


def test_dense_recovery_trains_every_decoder_weight():
    model = build_tiny_llama()
    masks = student_masks(model, None, dense=True)
    assert set(masks) == set(linear_weight_names(model)) and all(bool(m.all()) for m in masks.values())
    assert register_mask_hooks(model, pack_masks(masks)) == []  # nothing to mask: no per-step gradient copies
    pruned = magnitude_prune(build_tiny_llama())
    assert len(register_mask_hooks(pruned, pack_masks(masks_from_zeros(pruned)))) == 14
    with pytest.raises(AsftError, match="takes no --mask-file"):
        _cfg(dense=True, mask_file="m.safetensors")


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (13, 5), (64, 33)])
def test_packed_mask_round_trips_in_one_bit_per_entry(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) > 0.5
    packed = PackedMask.pack(mask)
    assert packed.bits.dtype == torch.uint8 and packed.nbytes == -(-mask.numel() // 8)
    assert torch.equal(packed.unpack(shape), mask) and torch.equal(packed.unpack(), mask.reshape(-1))
    assert packed.keeps_all is False or bool(mask.all())
    assert PackedMask.pack(torch.ones(shape, dtype=torch.bool)).keeps_all
    assert not PackedMask.pack(torch.ones(shape, dtype=torch.bool).index_fill(0, torch.tensor([0]), False)).keeps_all


def test_mask_file_is_checked(tmp_path):
    model = build_tiny_llama()
    name = "model.layers.0.mlp.up_proj.weight"
    good = torch.rand(128, 64) > 0.5
    save_file({name: good}, tmp_path / "good.safetensors")
    assert torch.equal(load_mask_file(tmp_path / "good.safetensors", model)[name], good)
    save_file({name: good.float()}, tmp_path / "float.safetensors")
    with pytest.raises(AsftError, match="expected bool"):
        load_mask_file(tmp_path / "float.safetensors", model)
    save_file({name: good.T.contiguous()}, tmp_path / "shape.safetensors")
    with pytest.raises(AsftError, match="shape"):
        load_mask_file(tmp_path / "shape.safetensors", model)
    save_file({"model.nope.weight": good}, tmp_path / "name.safetensors")
    with pytest.raises(AsftError, match="no parameter named"):
        load_mask_file(tmp_path / "name.safetensors", model)


def test_data_order_is_a_function_of_seed_and_step_only():
    stream = torch.arange(10_000, dtype=torch.int32)
    assert step_starts(0, 5, 8, 10_000, 64) == step_starts(0, 5, 8, 10_000, 64)
    assert step_starts(0, 5, 8, 10_000, 64) != step_starts(0, 6, 8, 10_000, 64)
    assert step_starts(0, 5, 8, 10_000, 64) != step_starts(1, 5, 8, 10_000, 64)
    # 2 workers x 2 micro-steps x micro batch 2 deal out exactly the step's 8 windows, no overlap
    rows = [micro_batch(stream, 0, 5, m, r, 2, 2, 2, 64) for m in range(2) for r in range(2)]
    starts = sorted(int(b[i, 0]) for b in rows for i in range(2))
    assert starts == sorted(step_starts(0, 5, 8, 10_000, 64))
    with pytest.raises(AsftError, match="not more than one window"):
        step_starts(0, 0, 1, 64, 64)


def _cfg(**kw):
    return RecoverConfig(model="m", out="o", **kw)


def test_deepspeed_config_fills_defaults_and_passes_user_keys_through():
    user = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 1000}, "gradient_clipping": "auto"}
    plan = build_plan(_cfg(micro_batch=2, grad_accum=3, clip=0.5), user, world=2)
    ds = plan.ds_config
    assert ds["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 1000,
                                       "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"}}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 3, 12)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}
    assert plan.build_optimizer and plan.build_scheduler and plan.lr == 5e-5 and plan.warmup_steps == 10
    assert user["gradient_clipping"] == "auto"  # the user's dict is not modified
    offload = build_plan(_cfg(), {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, world=1)
    assert offload.ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload.ds_config["zero_force_ds_cpu_optimizer"] is False
    own = build_plan(_cfg(), {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, world=1)
    assert not own.build_optimizer and own.lr == 1e-3 and own.ds_config["optimizer"]["params"]["weight_decay"] == 0.0


def test_zero3_buffers_are_sized_from_the_model_unless_the_file_sets_them():
    user = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 1000}}
    zero = build_plan(_cfg(), user, world=2, largest_linear=576 * 1536).ds_config["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 1000  # the file's value wins
    assert zero["reduce_bucket_size"] == 2 * 10**6 and zero["stage3_max_live_parameters"] == 3 * 10**6  # unit: 1e6
    big = build_plan(_cfg(), {"zero_optimization": {"stage": 3}}, world=2, largest_linear=8192 * 28672)
    assert big.ds_config["zero_optimization"]["sub_group_size"] == 8192 * 28672
    stage2 = build_plan(_cfg(), {}, world=2, largest_linear=576 * 1536).ds_config["zero_optimization"]
    assert "reduce_bucket_size" not in stage2  # ZeRO-2 keeps DeepSpeed's own


@pytest.mark.parametrize("flags, user, message", [
    ({"zero_stage": 2}, {"zero_optimization": {"stage": 3}}, "zero_optimization.stage = 3 conflicts with --zero-stage 2"),
    ({"micro_batch": 1}, {"train_micro_batch_size_per_gpu": 4}, "conflicts with --micro-batch 1"),
    ({"offload_optimizer": True}, {"zero_optimization": {"offload_optimizer": {"device": "none"}}}, "--offload-optimizer"),
    ({"lr": 1e-4}, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "conflicts with --lr"),
    ({}, {"train_batch_size": 5}, "train_batch_size = 5 conflicts"),
    ({}, {"fp16": {"enabled": True}}, "fp16 is not supported"),
    ({"offload_params": True}, {}, "parameter offload needs zero stage 3"),
])
def test_deepspeed_config_conflicts_are_one_line_errors(flags, user, message):
    with pytest.raises(AsftError, match=message.replace("(", r"\(")) as err:
        build_plan(_cfg(**flags), user, world=2, source="ds.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("ds.json: ")


def test_workers_return_freed_weights_to_the_os(monkeypatch):
    from asft_ray.recovery.recipe import worker_env

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    env = worker_env(use_gpu=False)
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(2**20) and env["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in worker_env(use_gpu=True)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert worker_env(use_gpu=False)["MALLOC_MMAP_THRESHOLD_"] == "65536"


def _resident_for_a_moment(mib: int = 64) -> None:
    """`mib` MiB resident for 50 ms: its own mapping (a freed heap block may stay resident), touched,
    then unmapped (gone from the RSS at once)."""
    import mmap

    block = mmap.mmap(-1, mib * 2**20)
    block.write(b"x" * len(block))
    time.sleep(0.05)
    block.close()


def test_phase_peaks_see_a_transient_allocation_in_its_phase():
    from asft_ray.recovery.phase_memory import PhasePeaks

    phases = PhasePeaks("before")
    phases.enter("big")
    _resident_for_a_moment()
    phases.enter("after")
    peaks = phases.stop()
    assert peaks["big"] >= peaks["before"] + 60 and peaks["after"] <= peaks["big"] - 30, peaks


def test_a_phase_inside_another_counts_for_both():
    from asft_ray.recovery.phase_memory import PhasePeaks

    phases = PhasePeaks("train/forward")
    phases.enter("train/backward")
    _resident_for_a_moment()
    phases.enter("export")
    peaks = phases.stop()
    assert peaks.keys() == {"train", "train/forward", "train/backward", "export"}
    assert peaks["train"] == peaks["train/backward"] >= peaks["train/forward"] + 60, peaks


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.2)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert 0.1 < warmup_cosine(12, 4, 20, 0.1) < 1.0


def test_recover_config_is_validated():
    with pytest.raises(AsftError, match="unknown key"):
        RecoverConfig.from_dict({"model": "m", "out": "o", "zero": 3})
    with pytest.raises(AsftError, match="need --teacher"):
        _cfg(kd_weight=1.0)
    with pytest.raises(AsftError, match="zero stage must be 2 or 3"):
        _cfg(zero_stage=1)
    assert _cfg(teacher="t").effective_kd_weight == 1.0 and _cfg().effective_kd_weight == 0.0


# ---------------------------------------------------------------- through the CLI: bad input, before Ray


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-pruned")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    save_model(magnitude_prune(model), AutoTokenizer.from_pretrained(tiny_model_dir), folder)
    return folder


@pytest.fixture(scope="module")
def untied_dirs(tmp_path_factory):
    """(dense, pruned) tiny Llamas with an untied head: under ZeRO-3 their vocabulary tables are
    split into parts (recovery/vocab_parts.py)."""
    from asft_ray.models import save_model
    from tests.conftest import build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-untied")
    tokenizer = build_tokenizer()
    model = build_tiny_llama(vocab_size=16384, tie_word_embeddings=False)  # tables just over 1e6 elements: 2 parts
    save_model(model, tokenizer, folder / "dense")
    save_model(magnitude_prune(model), tokenizer, folder / "pruned")
    return folder / "dense", folder / "pruned"


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-other-vocab")
    build_tiny_llama(vocab_size=600).save_pretrained(folder)
    return folder


def _run_cli(capsys, *args):
    from asft_ray.cli import main

    code = main(["recover", *args])
    return code, capsys.readouterr().err


def _assert_bad_input_is_one_line(capsys, tmp_path, args, message, data_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "asft_run.json").write_text("{}")  # an earlier asft-ray output: --overwrite may replace it, errors must not
    code, err = _run_cli(capsys, *args, "--zero-stage", "3", "--max-steps", "2", "--seqlen", "32",
                         "--data-dir", data_dir, "--out", str(out), "--overwrite")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("asft: error:") and message in lines[0], err
    assert sorted(p.name for p in out.iterdir()) == ["asft_run.json", "keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not (tmp_path / ".out.recover").exists()


def test_a_conflicting_deepspeed_file_is_one_line_before_ray(capsys, tmp_path, pruned_dir, data_dir):
    import ray

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    _assert_bad_input_is_one_line(capsys, tmp_path, ["--model", str(pruned_dir), "--deepspeed", str(ds)],
                                  "zero_optimization.stage = 2 conflicts with --zero-stage 3", data_dir)
    assert not ray.is_initialized()


def test_resume_from_a_state_folder_others_can_write_is_one_line_before_ray(capsys, tmp_path, pruned_dir, data_dir):
    """Issue 17 item 12: a checkpoint is unpickled, so --resume refuses a state folder it cannot trust,
    before Ray starts and without deleting it (tests/test_recover_trust.py has every other refusal)."""
    import ray

    state = tmp_path / ".out.recover"
    (state / "ckpt").mkdir(parents=True)
    (state / "state.json").write_text("{}")
    state.chmod(0o777)
    code, err = _run_cli(capsys, "--model", str(pruned_dir), "--max-steps", "2", "--seqlen", "32", "--data-dir", data_dir,
                         "--out", str(tmp_path / "out"), "--resume")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "is writable by every user" in lines[0], err
    assert lines[0].startswith("asft: error: --resume:") and not ray.is_initialized()
    assert (state / "state.json").read_text() == "{}" and (state / "ckpt").is_dir()


def test_inputs_read_on_ray_are_one_line_and_leave_out_alone(local_ray, capsys, tmp_path, tiny_model_dir, pruned_dir,
                                                             other_vocab_dir, data_dir):
    """The checks that read the model (no zeros, the teacher's vocabulary) run in the inputs task
    (recovery/inputs.py); workers no node set can hold fail before it. Every case on one cluster that outlives each call, as with --address:
    nothing but the one line may reach stderr (no "unhandled error" log of the task's other results)."""
    for case, args, message in (
        ("dense", ["--model", str(tiny_model_dir)], "no zero weights in its decoder linears"),
        ("teacher", ["--model", str(pruned_dir), "--teacher", str(other_vocab_dir)], "vocabulary size 600"),
        ("placement", ["--model", str(pruned_dir), "--workers", "9", "--worker-cpus", "1"],
         "9 recovery workers can never be placed: they ask 1 CPU each"),
    ):
        (tmp_path / case).mkdir()
        _assert_bad_input_is_one_line(capsys, tmp_path / case, args, message, data_dir)
        gc.collect()  # an unread error result would be logged when its ref is freed
        time.sleep(1)
        assert not [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()], case


# ---------------------------------------------------------------- 2 Ray Train workers, DeepSpeed ZeRO


def _recover(pruned_dir, out, data_dir, **kw):
    from asft_ray.recovery.recipe import run_recover

    values = dict(model=str(pruned_dir), out=str(out), data_dir=data_dir, workers=2, max_steps=4, seqlen=32,
                  grad_accum=2, lr=1e-3, weight_decay=0.01, warmup_steps=1, checkpoint_every=2)
    values.update(kw)
    return run_recover(RecoverConfig(**values))


def _assert_masks_held(record, out, pruned_dir):
    for key in ("mask_check",) + (("mask_check_after_resume",) if record["resumed_from_step"] else ()):
        check = record[key]
        assert check["params"] == 14 and check["master_checked"] == 14, check
        assert check["module"] == check["master"] == check["exp_avg"] == check["exp_avg_sq"] == 0, check
    # Adam moments: checked at the end (right after loading a ZeRO-2 checkpoint DeepSpeed has not linked them yet)
    assert record["mask_check"]["state_checked"] == 14
    before, after = load_file(pruned_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = 0
    for name in (n for n in before if ".layers." in n and "proj" in n):
        assert torch.all(after[name][before[name] == 0] == 0), name
        changed += int(not torch.equal(after[name], before[name]))
    assert changed == 14  # every pruned linear's surviving weights trained


def _assert_model_state_memory(record, pruned_dir, zero_stage, teacher_bytes_per_param=0):
    """Each worker holds what ZeRO promises (fp32, 2 workers, N parameters of which T train):
    optimizer state = half of an fp32 master copy and of the two Adam moments (12T/2 bytes) under
    both stages; parameters 4N under ZeRO-2. Under ZeRO-3 each worker holds its half of every
    parameter, and DeepSpeed keeps whole copies of parameters below its persistence threshold
    (1e4 elements: every decoder linear of this tiny model), so only the partitions' floor is checked.
    Gradients at the update: ZeRO-3 holds exactly its fp32 partition (4T/2), ZeRO-2 at least that
    and never a second whole copy. The teacher (same shape, `teacher_bytes_per_param` bytes each):
    whole under ZeRO-2, at least half and less than whole under ZeRO-3; none without one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    n = sum(p.numel() for p in model.parameters())
    t = sum(dict(model.named_parameters())[name].numel() for name in linear_weight_names(model))
    for worker in record["memory"]:
        assert abs(worker["optimizer_mib"] / (12 * t / 2 / 2**20) - 1) < 0.05, (worker, t)
        if zero_stage == 2:
            assert abs(worker["params_mib"] / (4 * n / 2**20) - 1) < 0.05, (worker, n)
        else:
            assert worker["params_mib"] >= 4 * n / 2 / 2**20, (worker, n)
        partition = 4 * t / 2 / 2**20
        if zero_stage == 3:
            assert abs(worker["grads_mib"] / partition - 1) < 0.05, (worker, t)
        else:
            assert 0.95 * partition <= worker["grads_mib"] < 4 * t / 2**20, (worker, t)
        whole_teacher = teacher_bytes_per_param * n / 2**20
        if not teacher_bytes_per_param:
            assert worker["teacher_mib"] == 0, worker
        else:
            assert zero_stage == 2 and abs(worker["teacher_mib"] / whole_teacher - 1) < 0.05, (worker, n)


# 3 eval windows over 2 workers: one pads with a discarded forward (ZeRO-3 gathers collectively)
ZERO3_RUN = dict(zero_stage=3, eval_every=2, eval_windows=3)


def _check_zero3_run(record, out, pruned_dir):
    """Masks held in the module, the master and both moments; each worker's state, peaks and reads."""
    assert len(record["losses"]) == 4 and record["world_size"] == 2 and len(record["memory"]) == 2
    _assert_masks_held(record, out, pruned_dir)
    _assert_model_state_memory(record, pruned_dir, zero_stage=3)
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir)
    masked_elements = sum(dict(pruned.named_parameters())[n].numel() for n in linear_weight_names(pruned))
    whole_bytes = sum(p.numel() * 4 for p in pruned.parameters())
    for worker in record["memory"]:  # where the peak was: the 10 ms samples see what the step ends and ru_maxrss saw
        phases = worker["rss_peak_by_phase_mib"]
        assert {"load", "eval", "train", "export"} <= phases.keys(), phases
        assert worker["train_rss_max_mib"] <= phases["train"] + 16, worker
        assert worker["peak_rss_mib"] <= max(phases.values()) + 32, worker  # the lifetime peak falls in a phase
    for worker in record["memory"]:  # partitioned loading: no whole parameter, half the reads, half the masks
        assert worker["load_full_param_bytes"] == 0, worker
        assert 0.45 * whole_bytes <= worker["load_read_bytes"] <= 0.55 * whole_bytes, (worker, whole_bytes)
        assert 0.45 * masked_elements / 8 <= worker["mask_bytes"] <= 0.55 * masked_elements / 8, worker  # 1 bit each


def test_a_zero3_run_keeps_its_masks_and_each_worker_holds_its_partition(local_ray, pruned_dir, tmp_path, data_dir):
    _check_zero3_run(_recover(pruned_dir, tmp_path / "full", data_dir, **ZERO3_RUN), tmp_path / "full", pruned_dir)


@pytest.mark.slow  # 115 s (3 Ray Train runs): `make test-slow`, and kill -9 then --resume in the fault suite. The
# default suite has one ZeRO-3 run (above) and the resume of prune and staged runs (test_resume.py, test_staged.py)
def test_zero3_stop_and_resume_equals_an_uninterrupted_run(local_ray, pruned_dir, tmp_path, data_dir):
    full = _recover(pruned_dir, tmp_path / "full", data_dir, **ZERO3_RUN)
    _check_zero3_run(full, tmp_path / "full", pruned_dir)

    # The interrupted run also recomputes activations in the backward instead of keeping them:
    # stopping, resuming and recomputing each leave the run bit for bit the same (one run shows all three).
    cut = dict(ZERO3_RUN, activation_checkpointing=True)
    stopped = _recover(pruned_dir, tmp_path / "cut", data_dir, stop_after_steps=2, **cut)
    assert stopped["stopped"] and stopped["steps_done"] == 2 and not (tmp_path / "cut").exists()
    resumed = _recover(pruned_dir, tmp_path / "cut", data_dir, resume=True, **cut)
    assert resumed["resumed_from_step"] == 2
    _assert_masks_held(resumed, tmp_path / "cut", pruned_dir)
    assert resumed["losses"] == full["losses"] and resumed["evals"] == full["evals"]
    assert [e["step"] for e in full["evals"]] == [0, 2, 4]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".cut.recover").exists()  # the state folder goes once the output is complete

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cut")
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
    record = json.loads((tmp_path / "cut" / "asft_run.json").read_text())
    assert record["losses"] == resumed["losses"] and record["tokens_per_s"] > 0


@pytest.mark.slow  # 45-50 s: `make test-slow`. The default suite has a ZeRO-3 run, ZeRO-2 with a teacher
# through the CLI (test_the_driver_never_imports_the_model_or_text_libraries) and every checkpoint refusal (test_recover_trust.py)
def test_zero2_with_distillation_keeps_masks_through_resume(local_ray, pruned_dir, tiny_model_dir, tmp_path, data_dir):
    kw = dict(zero_stage=2, teacher=str(tiny_model_dir), kd_weight=1.0, hidden_weight=0.1, eval_every=2, eval_windows=2,
              max_steps=3)
    assert _recover(pruned_dir, tmp_path / "kd", data_dir, stop_after_steps=2, **kw)["stopped"]
    # the checkpoint DeepSpeed wrote is listed byte for byte: a changed file is refused, not unpickled
    shard = next((tmp_path / ".kd.recover" / "ckpt" / "step-000002").glob("*optim_states.pt"))
    original = shard.read_bytes()
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(AsftError, match="is not the one this run wrote"):
        _recover(pruned_dir, tmp_path / "kd", data_dir, resume=True, **kw)
    shard.write_bytes(original)
    record = _recover(pruned_dir, tmp_path / "kd", data_dir, resume=True, **kw)
    assert record["resumed_from_step"] == 2 and len(record["losses"]) == 3
    _assert_masks_held(record, tmp_path / "kd", pruned_dir)
    assert [e["step"] for e in record["evals"]] == [0, 2, 3] and all(e["ppl"] > 1 for e in record["evals"])
    assert all({"lm", "kd", "hidden"} <= set(row) for row in record["history"])
    assert record["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert all(m["peak_rss_mib"] >= m["train_rss_max_mib"] > 0 for m in record["memory"])
    _assert_model_state_memory(record, pruned_dir, zero_stage=2, teacher_bytes_per_param=4)


@pytest.mark.slow  # 70 s (2 Ray Train runs): `make test-slow`. The default suite has a ZeRO-3 run (masks, memory)
# and the partitioned teacher's loss and vocabulary parts (test_recovery_zero3.py), and ZeRO-2 with a teacher through the CLI
def test_zero3_bf16_offload_with_sharded_teacher_matches_zero2(local_ray, untied_dirs, tmp_path, data_dir):
    """bf16 weights with an fp32 master, optimizer and parameters offloaded, the teacher partitioned,
    the untied embedding and head of both in vocabulary parts: masks hold in module, master and
    moments; the first loss (before any update) equals ZeRO-2's with a whole teacher, the curves
    agree to bf16 tolerance, and the frozen tables are written back whole, as they were."""
    tiny_model_dir, pruned_dir = untied_dirs
    kw = dict(teacher=str(tiny_model_dir), kd_weight=1.0, max_steps=3, checkpoint_every=0, bf16=True)
    three = _recover(pruned_dir, tmp_path / "z3", data_dir, zero_stage=3, offload_optimizer=True, offload_params=True, **kw)
    two = _recover(pruned_dir, tmp_path / "z2", data_dir, zero_stage=2, **kw)
    _assert_masks_held(three, tmp_path / "z3", pruned_dir)
    _assert_masks_held(two, tmp_path / "z2", pruned_dir)
    assert three["teacher_mib_after_training"] == two["teacher_mib_after_training"] == 0  # freed before the export
    source, exported = load_file(pruned_dir / "model.safetensors"), load_file(tmp_path / "z3" / "model.safetensors")
    assert exported.keys() == source.keys()
    assert all(torch.equal(exported[n], source[n]) for n in ("model.embed_tokens.weight", "lm_head.weight"))
    assert all({"lm", "kd"} <= set(row) for row in three["history"] + two["history"])
    assert two["deepspeed_config"]["zero_optimization"]["stage"] == 2
    zo = three["deepspeed_config"]["zero_optimization"]
    assert three["deepspeed_config"]["bf16"] == {"enabled": True}
    assert zo["offload_optimizer"]["device"] == "cpu" and zo["offload_param"]["device"] == "cpu"
    assert three["history"][0]["kd"] == pytest.approx(two["history"][0]["kd"], rel=1e-3, abs=1e-6)
    assert three["losses"][0] == pytest.approx(two["losses"][0], rel=1e-4)
    assert three["losses"] == pytest.approx(two["losses"], rel=1e-2)
    # the teacher's weights per worker, bf16: the whole model under ZeRO-2; under ZeRO-3 each worker's
    # half of every parameter, plus whole copies of those below DeepSpeed's persistence threshold
    from asft_ray.recovery.vocab_parts import part_rows

    tensors = load_file(tiny_model_dir / "model.safetensors")
    sizes = [t.numel() for t in tensors.values()]
    held = [t.numel() for n, t in tensors.items() if n not in ("model.embed_tokens.weight", "lm_head.weight")]
    held += [rows * 64 for _ in range(2) for rows in part_rows(*tensors["lm_head.weight"].shape, 10**6)]  # the parts
    threshold = zo["stage3_param_persistence_threshold"]
    partitioned = sum(-(-n // 2) + (n if n < threshold else 0) for n in held)
    assert all(abs(m["teacher_mib"] / (2 * sum(sizes) / 2**20) - 1) < 0.05 for m in two["memory"]), two["memory"]
    assert all(abs(m["teacher_mib"] / (2 * partitioned / 2**20) - 1) < 0.05 for m in three["memory"]), (
        sizes, [m["teacher_mib"] for m in three["memory"]])


DRIVER = """
import json, sys
from asft_ray.cli import main
code = main(sys.argv[1:])
print("MODULES " + json.dumps([m for m in ("transformers", "datasets", "tokenizers", "deepspeed") if m in sys.modules]))
sys.exit(code)
"""


def test_the_driver_never_imports_the_model_or_text_libraries(pruned_dir, tiny_model_dir, tmp_path, data_dir):
    """Issue 14: `asft recover` (its own process and embedded Ray cluster, as a user runs it) reads the
    masks, the teacher's config and the token streams in a Ray task; the driver itself never imports
    transformers (~80 MiB of config and model code), `datasets` or a tokenizer. The record shows that
    they were read all the same: the masks' sparsity, the stream's length and perplexity checks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    out = tmp_path / "out"
    args = ["recover", "--model", str(pruned_dir), "--teacher", str(tiny_model_dir), "--out", str(out),
            "--data-dir", data_dir, "--workers", "1", "--zero-stage", "2", "--max-steps", "1", "--seqlen", "32",
            "--eval-every", "1", "--eval-windows", "1", "--json", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = json.loads(proc.stdout.rsplit("MODULES ", 1)[1])
    assert modules == [], modules
    record = json.loads((out / "asft_run.json").read_text())
    assert record["masks"]["masked_params"] == 14 and 0.45 < record["masks"]["sparsity"] < 0.55, record["masks"]
    assert record["train_stream_tokens"] > 1000 and len(record["evals"]) == 2 and len(record["losses"]) == 1


def test_demo_config_is_valid_and_the_job_entrypoint_needs_a_config(capsys):
    from asft_ray.config import load_yaml
    from asft_ray.jobs.recover import run
    from tests.conftest import REPO

    cfg = RecoverConfig.from_dict(load_yaml(str(REPO / "configs" / "recover-demo.yaml")), source="recover-demo.yaml")
    plan = build_plan(cfg, {}, cfg.workers)
    assert cfg.teacher and plan.zero_stage == 2 and plan.ds_config["train_batch_size"] == 4
    assert run([]) == 2 and "usage" in capsys.readouterr().err
