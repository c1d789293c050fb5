"""2:4 semi-structured sparsity on GPUs: swap 2:4-pruned Linear weights for PyTorch's sparse kernels.

`torch.sparse.to_sparse_semi_structured` stores a 2:4 weight as its non-zeros plus metadata
and runs the matmul on the sparse tensor cores (cuSPARSELt, or CUTLASS). It exists only for
CUDA tensors in float16/bfloat16 (int8 too, not used here), and each weight must be a
multiple of the backend's block (16x16 for cuSPARSELt, 32x64 for CUTLASS in fp16/bf16).
On a CPU there is nothing to convert to: the model runs dense, and asking for it is an error.
"""

from __future__ import annotations

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


def check_2to4(model: nn.Module) -> dict:
    """Which decoder linears are valid 2:4 (at most 2 non-zeros in every 4 consecutive inputs of a row)."""
    invalid = []
    for name, lin in decoder_linears(model).items():
        w = lin.weight.detach()
        if w.shape[1] % 4 or not is_valid_nm(w, 2, 4):
            invalid.append(name)
    total = len(decoder_linears(model))
    return {"linears": total, "valid": total - len(invalid), "invalid": invalid}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise AsftError(CPU_MESSAGE)


@torch.no_grad()
def to_semistructured(model: nn.Module, dtype: str = "float16") -> dict:
    """Move the model to the GPU in fp16/bf16 and convert every 2:4 decoder linear in place.

    Raises AsftError on a CPU-only machine, for another dtype, or when a linear is not 2:4.
    A weight whose shape the backend refuses stays dense and is listed under "dense"."""
    require_cuda()
    if dtype not in DTYPES:
        raise AsftError(f"2:4 kernels run in {' or '.join(DTYPES)}, not {dtype}")
    check = check_2to4(model)
    if check["invalid"]:
        raise AsftError(f"{len(check['invalid'])} of {check['linears']} decoder linears are not 2:4 "
                        f"(first: {check['invalid'][0]}); prune with --pattern 2:4 first")
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    model.to(device="cuda", dtype=DTYPES[dtype])
    converted, dense = [], {}
    for name, lin in decoder_linears(model).items():
        try:
            lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach().contiguous()), requires_grad=False)
            converted.append(name)
        except (RuntimeError, ValueError) as err:
            dense[name] = str(err).splitlines()[0]
    backend = "cutlass" if SparseSemiStructuredTensor._FORCE_CUTLASS else "cusparselt"
    return {"converted": len(converted), "dense": dense, "dtype": dtype, "backend": backend,
            "device": torch.cuda.get_device_name()}
