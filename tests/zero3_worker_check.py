"""Run by tests/test_recovery_zero3.py under `torchrun --nproc_per_node 2` (gloo, CPU, no Ray).

Each worker builds the pruned student and the dense teacher partitioned with ZeRO-3, and records
what it read and holds; it also loads both models whole first (the reference, for the test's
sake only: the read counters belong to the partitioned loads), and rank 0 writes the facts as
JSON for the test to assert on.
    python -m torch.distributed.run --nproc_per_node 2 tests/zero3_worker_check.py PRUNED DENSE MASKS OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

os.environ["DS_ACCELERATOR"] = "cpu"


def main(pruned: str, dense: str, mask_file: str, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    dist.init_process_group("gloo")
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    from asft_ray.models import load_model
    from asft_ray.recovery import zero3
    from asft_ray.recovery.export import export_sharded
    from asft_ray.recovery.losses import kd_loss

    # no persistent (whole) parameters, so every parameter must be a partition
    ds = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": False},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
    facts: dict = {"world": world}

    # the whole models, for comparison only, before any HfDeepSpeedConfig exists (while one is
    # alive, from_pretrained itself goes the collective ZeRO-3 way)
    ref_student, _ = load_model(pruned, "cpu", show_progress=False)
    ref_teacher, _ = load_model(dense, "cpu", show_progress=False)
    student, keep, checkpoint = zero3.build_partitioned(pruned, ds, torch.float32)
    facts["full_param_bytes_after_build"] = sum(p.data.numel() * p.data.element_size() for p in student.parameters())
    dtypes = zero3.load_partitions(student, pruned, checkpoint)
    facts["full_param_bytes_after_load"] = sum(p.data.numel() * p.data.element_size() for p in student.parameters())
    facts["read_bytes"], facts["largest_read"] = checkpoint.bytes_read, checkpoint.largest_read
    facts["vocab_parts"] = len(student.vocab_part_sources)
    facts["largest_param_numel"] = max(p.ds_numel for p in student.parameters())
    masks = zero3.partition_masks(student, pruned, checkpoint, None, dense=False)
    facts["mask_bytes"] = sum(m.nbytes for m in masks.values())
    facts["mask_shapes_are_partitions"] = all(
        m.numel == dict(student.named_parameters())[n].partition_numel() for n, m in masks.items())

    # the same partitions from a mask file: the partition is zeroed where the file says so
    from_file, keep2, ckpt2 = zero3.build_partitioned(pruned, ds, torch.float32)
    zero3.load_partitions(from_file, pruned, ckpt2)
    file_masks = zero3.partition_masks(from_file, pruned, ckpt2, mask_file, dense=False)

    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    student_engine, *_ = deepspeed.initialize(model=student, config=ds)
    teacher, teacher_keep, teacher_checkpoint = zero3.build_partitioned(dense, ds, torch.float32)
    zero3.load_partitions(teacher, dense, teacher_checkpoint)
    teacher.requires_grad_(False)
    teacher_engine, *_ = deepspeed.initialize(model=teacher, config=ds)
    student_engine.eval()
    teacher_engine.eval()
    with torch.no_grad():
        s_logits, t_logits = student_engine(input_ids=ids).logits, teacher_engine(input_ids=ids).logits
    facts["kd_sharded"] = float(kd_loss(s_logits, t_logits, 2.0))

    # gather each rank's partition masks on rank 0 to compare with the whole weights' zeros
    gathered = [None] * world
    dist.all_gather_object(gathered, {"zeros": {n: m.unpack().tolist() for n, m in masks.items()},
                                      "file": {n: m.unpack().tolist() for n, m in file_masks.items()},
                                      "partition_numel": {n: dict(student.named_parameters())[n].partition_numel()
                                                          for n in masks}})
    export_sharded(student_engine.module, [], dtypes, pruned, Path(out) / "export", rank, checkpoint=None,
                   max_shard_bytes=40_000)
    if rank == 0:
        with torch.no_grad():
            facts["kd_full"] = float(kd_loss(ref_student(input_ids=ids).logits, ref_teacher(input_ids=ids).logits, 2.0))
            facts["student_logits_max_diff"] = float((ref_student(input_ids=ids).logits - s_logits).abs().max())
        from safetensors.torch import load_file

        file_masks_whole = load_file(mask_file)
        params = dict(ref_student.named_parameters())
        mismatches = []
        for name in gathered[0]["zeros"]:
            whole = (params[name].detach() != 0).reshape(-1)
            parts = [torch.tensor(g["zeros"][name]) for g in gathered]
            n = gathered[0]["partition_numel"][name]
            if not torch.equal(torch.cat(parts)[: whole.numel()], whole) or torch.cat(parts)[whole.numel():].any():
                mismatches.append(name)
            if n * world < whole.numel():
                mismatches.append(f"{name}: partitions do not cover the weight")
        for name in gathered[0]["file"]:
            whole = file_masks_whole[name].reshape(-1)
            parts = torch.cat([torch.tensor(g["file"][name]) for g in gathered])
            if not torch.equal(parts[: whole.numel()], whole):
                mismatches.append(f"file:{name}")
        facts["mask_mismatches"] = mismatches
        facts["file_masks"] = sorted(gathered[0]["file"])
        facts["file_bytes"] = sum(p.stat().st_size for p in Path(pruned).glob("*.safetensors"))
        facts["model_param_bytes"] = sum(p.numel() * p.element_size() for p in ref_student.parameters())
        facts["largest_weight_numel"] = max(p.numel() for p in ref_student.parameters())
    all_facts = [None] * world
    dist.all_gather_object(all_facts, facts)
    if rank == 0:
        Path(out, "facts.json").write_text(json.dumps(all_facts, indent=1))
    del keep, keep2, teacher_keep
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
