"""The expert store allocates host memory exactly (issue 10, item 5): no caching-host-allocator
rounding to powers of two. Without pinning it keeps vLLM's own CPU tensors (no copy); with pinning
each layer is one page-aligned buffer of its exact size, registered once (cudaHostRegister on CUDA;
here a recording registrar, the same seam)."""
from __future__ import annotations

import torch

from moespac_vllm.offload import HOST_PAGE_BYTES, ExpertStore
from moespac_vllm.trace import MIXTRAL_8X7B, QWEN3_30B_A3B


class Registrar:
    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def __call__(self, t: torch.Tensor) -> None:
        self.ranges.append((t.data_ptr(), t.numel() * t.element_size()))


def _weights(E: int, H: int, inter: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(E, 2 * inter, H, generator=g).to(dtype),
            torch.randn(E, H, inter, generator=g).to(dtype))


def test_unpinned_store_keeps_vllms_tensors_without_a_copy():
    store = ExpertStore(pin_memory=False)
    w13, w2 = _weights(8, 64, 24)
    store.add_layer(0, w13, w2)
    assert store.w13(0).data_ptr() == w13.data_ptr() and store.w2(0).data_ptr() == w2.data_ptr()
    assert store.allocated_bytes == 0 and store.allocations == 0


def test_pinned_store_registers_one_exact_page_aligned_buffer_per_layer():
    reg = Registrar()
    store = ExpertStore(pin_memory=True, host_register=reg)
    shapes = [(8, 64, 24), (16, 96, 40), (3, 32, 8)]
    for layer, (E, H, inter) in enumerate(shapes):
        w13, w2 = _weights(E, H, inter)
        store.add_layer(layer, w13, w2)
        assert torch.equal(store.w13(layer), w13) and torch.equal(store.w2(layer), w2)
    assert len(reg.ranges) == len(shapes) == store.allocations
    exact = 0
    for layer, ((ptr, nbytes), (E, H, inter)) in enumerate(zip(reg.ranges, shapes)):
        need = 3 * E * H * inter * 2
        exact += need
        assert ptr % HOST_PAGE_BYTES == 0 and nbytes % HOST_PAGE_BYTES == 0
        assert need <= nbytes < need + 256 + HOST_PAGE_BYTES  # exact, up to alignment
        for t in (store.w13(layer), store.w2(layer)):  # both weights inside the registered range
            assert ptr <= t.data_ptr() and t.data_ptr() + t.numel() * 2 <= ptr + nbytes
    assert store.allocated_bytes == sum(n for _, n in reg.ranges)
    assert store.allocated_bytes < exact + len(shapes) * (256 + HOST_PAGE_BYTES)
    assert store.total_bytes == exact


def test_spare_rows_are_zeroed_and_inside_the_same_buffer():
    reg = Registrar()
    store = ExpertStore(pin_memory=True, host_register=reg)
    w13, w2 = _weights(4, 32, 16)
    store.add_layer(0, w13, w2, spare_rows=2)
    s13, s2 = store.spare(0)
    assert s13.shape[0] == 2 and not s13.any() and not s2.any()
    assert len(reg.ranges) == 1 and store.rows(0)[0].shape[0] == 6


def test_readme_host_memory_examples():
    """README: host RAM = L x E x 3 H I x dtype bytes (+ < 4.4 KB per layer)."""
    assert round(QWEN3_30B_A3B.num_layers * QWEN3_30B_A3B.num_experts
                 * QWEN3_30B_A3B.expert_bytes / 1e9, 1) == 58.0
    assert round(MIXTRAL_8X7B.num_layers * MIXTRAL_8X7B.num_experts
                 * MIXTRAL_8X7B.expert_bytes / 1e9, 1) == 90.2
