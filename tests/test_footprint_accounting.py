"""``footprint()`` against an independent walk of what the store holds.

The walk starts at ``model.lsa.store`` and follows attributes (``vars()``) of every lsa_rewrite object
it reaches (the store, its per-layer objects, anything they hold: policy, mover, ...) and every list,
tuple, set and dict, collecting tensors. Tensors held under a ``mirror*`` attribute are the host
mirror; every other tensor on the store's device is device memory the store holds. Device bytes are
counted per storage (views of one stacked allocation count once, whole); mirror bytes as the union of
the byte ranges the mirror tensors cover (their shared arena also holds alignment padding). Then
``resident_kv_bytes`` must equal the device bytes and ``mirror_bytes`` the mirror bytes, after the
prefill and after every decode step: a tensor left out of the accounting (a counter, a table) fails
here. The main tests run with ``recall_lag=0``; with a lag, the tables a selection installs only
``recall_lag`` steps later are held meanwhile too (``test_pending_recall_tables_are_counted``).
"""

from __future__ import annotations

import pytest
import torch
from helpers import no_eos
from selection_trace import ResidentTrace, buffer_decode
from zoo import make_model

import lsa_rewrite
from lsa_rewrite import LSAConfig

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEW = 300, 60


def walk_tensors(root) -> list[tuple[str, torch.Tensor]]:
    """Every tensor reachable from ``root`` through lsa_rewrite objects and containers, with its path."""
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()

    def visit(obj, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            found.append((path, obj))
            return
        if obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.dtype, torch.device)) or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            for key, value in obj.items():
                visit(value, f"{path}[{key!r}]")
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for i, value in enumerate(obj):
                visit(value, f"{path}[{i}]")
        elif type(obj).__module__.startswith("lsa_rewrite"):
            attrs = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
            for slot in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, slot):
                    attrs[slot] = getattr(obj, slot)
            for name, value in attrs.items():
                visit(value, f"{path}.{name}")

    visit(root, "store")
    return found


def _is_mirror(path: str) -> bool:
    return path.rsplit(".", 1)[-1].split("[", 1)[0].startswith("mirror")


def walked_bytes(store, device: torch.device) -> tuple[int, int, list[str]]:
    """(device bytes, mirror bytes, paths of tensors that are neither on ``device`` nor a mirror)."""
    storages: dict[int, int] = {}
    mirror_ranges: dict[int, list[tuple[int, int]]] = {}
    stray = []
    for path, t in walk_tensors(store):
        if t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if _is_mirror(path):
            assert t.device.type == "cpu", f"{path} is a mirror on {t.device}"
            start = t.storage_offset() * t.element_size()
            assert t.is_contiguous(), f"{path}: a mirror view that is not contiguous"
            mirror_ranges.setdefault(storage.data_ptr(), []).append((start, start + t.numel() * t.element_size()))
        elif t.device == device:
            storages[storage.data_ptr()] = storage.nbytes()
        else:
            stray.append(path)
    mirror = 0
    for ranges in mirror_ranges.values():
        end = -1
        for lo, hi in sorted(ranges):
            mirror += max(0, hi - max(lo, end))
            end = max(end, hi)
    return sum(storages.values()), mirror, stray


def check_accounting(model) -> None:
    store = model.lsa.store
    fp = lsa_rewrite.footprint(model)
    device, mirror, stray = walked_bytes(store, next(model.parameters()).device)
    assert not stray, f"host tensors that are no mirror: {stray}"
    assert fp["resident_kv_bytes"] == device, (
        f"footprint counts {fp['resident_kv_bytes']} device bytes, the store holds {device} "
        f"(step {store.length}, {store.selections} selections)"
    )
    assert fp["mirror_bytes"] == mirror, f"footprint counts {fp['mirror_bytes']} mirror bytes, the store holds {mirror}"
    assert fp["pool_bytes"] + fp["index_bytes"] + fp["table_bytes"] == fp["resident_kv_bytes"]


def config(mode: str, **overrides) -> LSAConfig:
    fields = dict(budget=96, chunk_size=16, interval=16, sink_tokens=16, recent_tokens=16, mode=mode, recall_lag=0)
    return LSAConfig(**(fields | overrides))


@pytest.mark.parametrize(
    ("family", "mode"),
    [("llama", "offload"), ("llama", "evict"), ("llama", "dense"), ("gemma3", "offload"), ("qwen3", "evict")],
)
def test_hf_footprint_is_what_the_store_holds(family, mode):
    model = no_eos(lsa_rewrite.convert(make_model(family), config(mode)))
    ids = torch.randint(3, 250, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    trace = ResidentTrace(model, on_step=check_accounting)  # after the prefill and after every step
    model.generate(ids, max_new_tokens=NEW, do_sample=False, logits_processor=trace.processors())
    fp = lsa_rewrite.footprint(model)
    assert len(trace.sets) == NEW
    if mode == "dense":
        assert fp["selections"] == 0 and fp["mirror_bytes"] == 0
    else:
        assert fp["selections"] >= 4
        assert (fp["mirror_bytes"] > 0) == (mode == "offload")


@pytest.mark.parametrize("mode", ["offload", "evict"])
def test_buffer_footprint_is_what_the_store_holds(mode):
    base = make_model("buffer")
    base.setup_caches(max_batch_size=2, max_seq_length=512)
    model = lsa_rewrite.convert(base, config(mode))
    ids = torch.randint(3, 250, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    trace = ResidentTrace(model, on_step=check_accounting)
    buffer_decode(model, ids, NEW, trace=trace)
    assert lsa_rewrite.footprint(model)["selections"] >= 4


def test_pending_recall_tables_are_counted():
    model = no_eos(lsa_rewrite.convert(make_model("llama"), config("offload", recall_lag=3)))
    ids = torch.randint(3, 250, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    trace = ResidentTrace(model, on_step=check_accounting)
    model.generate(ids, max_new_tokens=NEW, do_sample=False, logits_processor=trace.processors())
    assert lsa_rewrite.footprint(model)["selections"] >= 4


def test_walk_finds_what_the_accounting_must_count():
    """The walk itself: a tensor hung anywhere under the store (here a list in a per-layer object) is
    found and breaks the equality, so the test above cannot pass by walking too little."""
    model = no_eos(lsa_rewrite.convert(make_model("llama"), config("offload")))
    model.generate(torch.randint(3, 250, (1, PROMPT)), max_new_tokens=20, do_sample=False)
    check_accounting(model)
    store = model.lsa.store
    layer = next(iter(store.layers.values()))
    layer.extra_for_test = [torch.zeros(3, dtype=torch.int64)]
    with pytest.raises(AssertionError, match="device bytes"):
        check_accounting(model)
    del layer.extra_for_test
    check_accounting(model)
