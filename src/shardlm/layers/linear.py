"""Linear layers whose weights are filled by the loader.

Layout: the weight is stored transposed, as ``weight_t`` [in_features, out_features], and the
forward is ``x @ weight_t``. For decode (one row of x), CPU BLAS streams that layout at about
twice the bandwidth of x @ Wᵀ with W [out, in]; on GPUs both layouts are equally fast.

Split-K on CPU: BLAS runs a single-row product (GEMV) on one core, which cannot saturate the
memory bus. Viewing the weight as ``splits`` row blocks [S, in/S, out] (a free view of the
same memory) turns it into a batched GEMM over S cores, each reading 1/S of the weight:

    x W = Σ_s x[:, s-th block of in] · W[s-th block of rows]

and the S partial products are summed. Measured on the 2-core dev machine: 23 → 33 GB/s on
a 512×32000 head, 11 → 20 GB/s on 1536×512 (docs/benchmarks.md). The sum reorders float
additions, so results differ from the plain product by rounding only. It pays only while the
product is bandwidth-bound: from ~64 rows of x on, BLAS's own threading is as fast, so larger
batches (prefill) take the plain path.

Half precision on CPU (``pack_for_cpu``): no BLAS path streams a bfloat16 ``weight_t`` fast
(split-K reaches ~20 GB/s, half of float32's, so bfloat16 decoded *slower* than float32);
oneDNN's linear on a weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``) streams ~39 GB/s for one row and stays
bandwidth-bound for a few (benchmarks/cpu_linear.py). The runner packs every bfloat16 /
float16 Linear after loading and the weight transforms; the plain weight is then dropped,
except where the tied embedding still reads it.

Weights are created uninitialised (``torch.empty``): the loader overwrites every element, and
random initialisation of a multi-GB model would cost seconds for nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from shardlm.distributed.parallel_state import TPContext


def split_k_matmul(x: torch.Tensor, weight_t: torch.Tensor, splits: int) -> torch.Tensor:
    """x [T, in] @ weight_t [in, out], computed as ``splits`` partial products summed."""
    t, k = x.shape
    out = weight_t.shape[1]
    parts = torch.bmm(
        x.reshape(t, splits, k // splits).transpose(0, 1),
        weight_t.view(splits, k // splits, out),
    )
    return parts.sum(0)


# Rows of x up to which split-K beats the plain product (benchmarks/gemv_layouts.py --rows).
SPLIT_K_MAX_ROWS = 32


def choose_splits(in_features: int, device: torch.device) -> int:
    """How many row blocks to split a weight into: one per CPU thread, 1 on accelerators."""
    if device.type != "cpu":
        return 1
    splits = max(1, torch.get_num_threads())
    while in_features % splits:
        splits -= 1
    return splits


def can_pack_for_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's packed linear applies: half precision on a CPU whose oneDNN supports it."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


class Linear(nn.Module):
    """y = x W (+ b). ``out_features`` may be the concatenation of several checkpoint
    projections (q|k|v or gate|up) so one matmul replaces several.

    Tensor parallelism (figure 1) uses it two ways. Column-parallel: this rank holds a slice of
    the output features and its output stays sharded (no communication). Row-parallel
    (``tp`` given): this rank holds a slice of the *input* features, so x W is a partial sum
    over ranks, completed by an AllReduce before the bias is added.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp: TPContext | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.splits = choose_splits(in_features, self.weight_t.device)
        self.tp = tp  # set: row-parallel, AllReduce the partial sums
        self.packed: torch.Tensor | None = None  # oneDNN's blocked copy (pack_for_cpu)
        self.packed_bytes = 0

    def pack_for_cpu(self, keep_weight: bool = False) -> bool:
        """Use oneDNN's linear on a reordered copy of the weight (half precision on CPU; see
        the module docstring). ``keep_weight``: the plain weight is still read elsewhere
        (the tied embedding). False, and nothing changes, where it does not apply."""
        w = self.weight_t
        if not can_pack_for_cpu(w.device, w.dtype) or self.packed is not None:
            return False
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().t().contiguous(), 1)
        self.packed_bytes = w.nbytes
        if not keep_weight:  # the packed copy is the weight now: free the plain one
            self.weight_t = nn.Parameter(w.new_empty(0, 0), requires_grad=False)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        elif self.splits > 1 and x.shape[0] <= SPLIT_K_MAX_ROWS:
            y = split_k_matmul(x, self.weight_t, self.splits)
        else:
            y = x @ self.weight_t
        if self.tp is not None:
            self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias
