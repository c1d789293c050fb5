"""2:4 semi-structured sparsity on GPUs: swap 2:4-pruned Linear weights for PyTorch's sparse kernels.

`torch.sparse.to_sparse_semi_structured` stores a 2:4 weight as its non-zeros plus metadata
and runs the matmul on the sparse tensor cores (cuSPARSELt, or CUTLASS). It exists only for
CUDA tensors in float16/bfloat16 (int8 too, not used here), and each weight must be a
multiple of the backend's block (16x16 for cuSPARSELt, 32x64 for CUTLASS in fp16/bf16).
On a CPU there is nothing to convert to: the model runs dense, and asking for it is an error.

A safetensors model folder is exported one decoder layer at a time (save_semistructured_streamed);
`to_semistructured` converts a model in memory, for serving it or for a GGUF/hub source.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from asft_ray.errors import AsftError
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.pruning.masks import is_valid_nm

CPU_MESSAGE = "2:4 semi-structured kernels need a CUDA GPU; on CPU the model runs dense"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {f"layers.{i}.{name}": lin for i, layer in enumerate(decoder_layers(model))
            for name, lin in prunable_linears(layer).items()}


def is_2to4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive inputs of each row."""
    return weight.shape[1] % 4 == 0 and is_valid_nm(weight.detach(), 2, 4)


def check_2to4(model: nn.Module) -> dict:
    """Which decoder linears are valid 2:4."""
    invalid = [name for name, lin in decoder_linears(model).items() if not is_2to4(lin.weight)]
    total = len(decoder_linears(model))
    return {"linears": total, "valid": total - len(invalid), "invalid": invalid}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise AsftError(CPU_MESSAGE)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise AsftError(f"2:4 kernels run in {' or '.join(DTYPES)}, not {dtype}")


def to_kernel(weight: torch.Tensor):
    """(the weight in the 2:4 kernels' layout, None), or (None, the backend's reason) when it refuses
    the weight (its shape is not a multiple of the backend's block). `weight`: fp16/bf16 on CUDA."""
    from torch.sparse import to_sparse_semi_structured

    try:
        return to_sparse_semi_structured(weight.detach().contiguous()), None
    except (RuntimeError, ValueError) as err:
        return None, str(err).splitlines()[0]


def kernel_refusal(weight: torch.Tensor) -> str | None:
    """Convert one CPU weight on the GPU and drop the result: None when the kernels take it, else why not."""
    converted, reason = to_kernel(weight.to("cuda"))
    del converted
    return reason


def _backend_report(dtype: str, converted: int, dense: dict) -> dict:
    from torch.sparse import SparseSemiStructuredTensor

    backend = "cutlass" if SparseSemiStructuredTensor._FORCE_CUTLASS else "cusparselt"
    return {"converted": converted, "dense": dense, "dtype": dtype, "backend": backend,
            "device": torch.cuda.get_device_name()}


def _not_2to4(invalid: list[str], among: str) -> AsftError:
    return AsftError(f"{len(invalid)} of {among} are not 2:4 "
                     f"(first: {invalid[0]}); prune with --pattern 2:4 first")


@torch.no_grad()
def to_semistructured(model: nn.Module, dtype: str = "float16") -> dict:
    """Move the model to the GPU in fp16/bf16 and convert every 2:4 decoder linear in place.

    Raises AsftError on a CPU-only machine, for another dtype, or when a linear is not 2:4.
    A weight whose shape the backend refuses stays dense and is listed under "dense"."""
    require_cuda()
    check_dtype(dtype)
    check = check_2to4(model)
    if check["invalid"]:
        raise _not_2to4(check["invalid"], f"{check['linears']} decoder linears")
    model.to(device="cuda", dtype=DTYPES[dtype])
    converted, dense = [], {}
    for name, lin in decoder_linears(model).items():
        sparse, reason = to_kernel(lin.weight)
        if reason is None:
            lin.weight = nn.Parameter(sparse, requires_grad=False)
            converted.append(name)
        else:
            dense[name] = reason
    return _backend_report(dtype, len(converted), dense)


@torch.no_grad()
def save_semistructured_streamed(source: Path, out: Path, dtype: str = "float16", tokenizer=None) -> dict:
    """The `semistructured` export of a safetensors model folder, one decoder layer in memory at a time.

    Writes what the in-memory export writes (the model's tensors in `dtype`, a checkpoint
    transformers loads, one shard a layer) and `semistructured.json`. Each decoder linear is
    checked to be 2:4 on the CPU, then converted on the GPU (one weight there at a time) to
    record whether the kernels take it. A linear that is not 2:4 stops the export; nothing of
    it is left behind."""
    from transformers import AutoConfig

    from asft_ray.artifacts import atomic_output_dir, write_json_atomic
    from asft_ray.models import model_skeleton
    from asft_ray.pruning.streaming import SafetensorsReader, StreamedLayers, copy_generation_config

    require_cuda()
    check_dtype(dtype)
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    skeleton = model_skeleton(config)
    layers = decoder_layers(skeleton)
    converted, dense = 0, {}
    with atomic_output_dir(Path(out)) as tmp:
        store = StreamedLayers(skeleton, SafetensorsReader(Path(source)), tmp, dtype=DTYPES[dtype])
        for index, layer in enumerate(layers):
            store.load(index, layer)
            layer.to(DTYPES[dtype])
            linears = prunable_linears(layer)
            invalid = [f"layers.{index}.{name}" for name, lin in linears.items() if not is_2to4(lin.weight)]
            if invalid:
                raise _not_2to4(invalid, f"layer {index}'s {len(linears)} linears")
            for name, lin in linears.items():
                reason = kernel_refusal(lin.weight)
                if reason is None:
                    converted += 1
                else:
                    dense[f"layers.{index}.{name}"] = reason
            store.release(index, layer)
        store.finish(skeleton)
        config.dtype = DTYPES[dtype]
        config.save_pretrained(tmp)
        copy_generation_config(Path(source), tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report = {**_backend_report(dtype, converted, dense), "streamed": True}
        write_json_atomic(tmp / "semistructured.json", report)
    return report
