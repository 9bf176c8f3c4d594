"""The packed weights live on transparent huge pages where Linux offers them."""

import pathlib

import pytest
import torch

from microturn.engine.paged_attention import PagedSequence
from microturn.kernels.huge_pages import HUGE_PAGE, copies_on_huge_pages, huge_page_bytes
from microturn.model import native_layers
from microturn.model.config import ModelConfig
from microturn.model.decoder import Decoder, init_random_weights

THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
thp_mode = THP.read_text().split("[")[1].split("]")[0] if THP.exists() else "never"
needs_thp = pytest.mark.skipif(thp_mode == "never", reason="no transparent huge pages here")


def huge_kib_at(address: int) -> int:
    """AnonHugePages of the mapping that holds `address` (from /proc/self/smaps)."""
    inside = False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_copies_are_exact_aligned_and_independent():
    sources = [torch.randn(300, 577).to(torch.bfloat16), torch.randn(3), torch.randn(1 << 20)]
    copies = copies_on_huge_pages(sources)
    for source, copy in zip(sources, copies, strict=True):
        assert torch.equal(source, copy) and copy.is_contiguous() and copy.dtype == source.dtype
        assert copy.data_ptr() % 64 == 0 and copy.data_ptr() != source.data_ptr()
    copies[1].zero_()
    assert torch.equal(copies[0], sources[0]) and torch.equal(copies[2], sources[2])
    region = huge_page_bytes(3 * HUGE_PAGE + 5)
    assert region.numel() == 3 * HUGE_PAGE + 5 and not region.any()


@needs_thp
def test_large_allocations_are_backed_by_huge_pages():
    pool = huge_page_bytes(8 * HUGE_PAGE).view(torch.bfloat16)
    pool.fill_(1.0)  # pages are mapped on first touch
    assert pool.data_ptr() % HUGE_PAGE == 0
    assert huge_kib_at(pool.data_ptr()) >= 4 * HUGE_PAGE // 1024
    if thp_mode == "madvise":  # negative control: torch's own memory of the same size is not
        plain = torch.ones(8 * HUGE_PAGE // 2, dtype=torch.bfloat16)
        assert huge_kib_at(plain.data_ptr()) == 0


# big enough that its packed weights and a 4,096-slot KV pool span whole huge pages
CONFIG = ModelConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                     head_dim=64, intermediate_size=768, rms_norm_eps=1e-6, rope_theta=10000.0,
                     rope_layout="half", max_position=4096, tie_word_embeddings=True)


@needs_thp
def test_the_native_stack_streams_weights_from_huge_pages():
    model = init_random_weights(Decoder(CONFIG), seed=0).to(torch.bfloat16).eval()
    cache = PagedSequence(CONFIG, 4096, model.dtype)  # 4 MiB per pool
    ids = torch.randint(0, CONFIG.vocab_size, (1, 40))
    with torch.inference_mode():
        before = model(ids, torch.arange(40).unsqueeze(0), cache, logits_at=torch.tensor([39]))
        panels = model.layers[0].mlp.gate_up_proj.panels()
        assert huge_kib_at(panels.data_ptr()) > 0  # the stack moved the packed weights
        native_layers._stacks.clear()  # built again: the same bits from the moved weights
        cache.length = 0
        again = model(ids, torch.arange(40).unsqueeze(0), cache, logits_at=torch.tensor([39]))
    assert torch.equal(before, again)


@needs_thp
def test_the_kv_pool_sits_on_huge_pages_and_starts_zeroed():
    pool = PagedSequence(CONFIG, 4096, torch.bfloat16).pool  # 4 MiB each for keys and values
    for part in (pool.k, pool.v):
        assert part.data_ptr() % HUGE_PAGE == 0 and not part.any()
        assert huge_kib_at(part.data_ptr()) >= HUGE_PAGE // 1024
