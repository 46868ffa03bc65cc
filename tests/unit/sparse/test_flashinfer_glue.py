"""The glue between the sparse page table and FlashInfer's batch decode wrapper.

FlashInfer needs a GPU, so its wrapper is replaced by a recorder that computes the same
attention with the PyTorch paged reference (and, like FlashInfer, returns the log-sum-exp
in base 2). What is checked is ours: which wrapper a group size gets, that a step plans
once for all its layers, how the workspace is viewed as pages, and the lse's base.
The kernel itself is checked on a GPU by ``eval/sparse_gpu_bench.py``.
"""

import math
import sys
import types

import torch

from sgl_kvtier.sparse.paged import PageTable, paged_decode_ref, region_table


class _Recorder:
    made: list = []

    def __init__(self, buffer, layout, use_tensor_cores):
        assert layout == "NHD" and buffer.dtype == torch.uint8
        self.tensor_cores, self.plans = use_tensor_cores, []
        _Recorder.made.append(self)

    def plan(self, indptr, indices, last_page_len, *, num_qo_heads, num_kv_heads, head_dim,
             page_size, q_data_type, kv_data_type, sm_scale):
        assert num_kv_heads == 1 and indptr.dtype == torch.int32
        self.table = PageTable(indptr, indices, last_page_len, page_size)
        self.scale = sm_scale
        self.plans.append(num_qo_heads)

    def run(self, q, pages, return_lse):
        k, v = pages  # [pages, page_size, 1, D]
        assert k.dim() == 4 and k.shape[2] == 1 and return_lse
        out, lse = paged_decode_ref(q, k.flatten(0, 2), v.flatten(0, 2), self.table, self.scale)
        return out.to(q.dtype), lse / math.log(2.0)


def _decoder(monkeypatch):
    _Recorder.made = []
    fake = types.SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=_Recorder)
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    from sgl_kvtier.sparse.flashinfer_decode import FlashInferDecode
    return FlashInferDecode(torch.device("cpu"))


def test_one_plan_per_step_and_natural_log_lse(monkeypatch):
    decode = _decoder(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    table = region_table(torch.tensor([0, 40, 80]), torch.tensor([40, 7, 33]), page_size=1)
    q = torch.randn(3, 4, 32, generator=gen)
    for _layer in range(3):  # one step: the same table for every layer
        k, v = torch.randn(2, 120, 32, generator=gen)
        out, lse = decode(q, k, v, table, 0.2)
        want, want_lse = paged_decode_ref(q, k, v, table, 0.2)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(lse, want_lse)
    (wrapper,) = _Recorder.made
    assert wrapper.plans == [4] and not wrapper.tensor_cores
    decode(q, k, v, region_table(torch.tensor([0, 40, 80]), 5), 0.2)  # the next step
    assert wrapper.plans == [4, 4]


def test_group_sizes_without_a_cuda_core_kernel_take_tensor_cores(monkeypatch):
    decode = _decoder(monkeypatch)
    table = region_table(torch.tensor([0, 16]), 16, page_size=8)
    k, v = torch.randn(2, 32, 64)
    for group, tensor_cores in ((4, False), (5, True), (3, False)):
        decode(torch.randn(2, group, 64), k, v, table, 0.125)
        assert _Recorder.made[-1 if tensor_cores else 0].tensor_cores == tensor_cores
    assert [w.tensor_cores for w in _Recorder.made] == [False, True]
    assert _Recorder.made[0].plans == [4, 3]  # replanned when the group changed back
