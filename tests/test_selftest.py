"""``python -m lsa_rewrite.selftest``: the self-test runs and its checks can fail."""

from __future__ import annotations

import torch

from lsa_rewrite import selftest


def test_selftest_passes_on_cpu():
    rows = selftest.run("cpu", prompt=320, new_tokens=20, models=("llama",))
    assert [r["check"] for r in rows] == [
        "covering", "sparse lag 0", "sparse lag 1", "sparse lag 4", "sparse lag 4 indexer", "sparse lag 4 indexer groups",
        "multi-turn exact prefill", "fp8 mirror recall",
    ]
    assert all(r["ok"] for r in rows), rows
    assert all(r["recalled_chunks"] > 0 and r["recall_checked"] > 0 for r in rows[1:-2])
    assert rows[-2]["sparse"] and rows[-2]["max_abs_diff"] <= 1e-4
    assert rows[-1]["decoded_from_mirror"] > 0 and rows[-1]["mismatches"] == 0


def test_selftest_reports_a_corrupted_fp8_recall(monkeypatch):
    """A compact-mirror recall that decodes the wrong chunk rows is caught."""
    import lsa_rewrite.runtime.mover as mover
    real = mover.unpack_chunks_impl

    def shifted(pool_k, pool_v, mirror_k, mirror_v, dst_rows, src_rows):
        src_rows = torch.where(src_rows >= 0, (src_rows + 1) % (mirror_k.shape[0] * mirror_k.shape[1]), src_rows)
        return real(pool_k, pool_v, mirror_k, mirror_v, dst_rows, src_rows)

    monkeypatch.setattr(mover, "unpack_chunks_impl", shifted)
    rows = selftest.run("cpu", prompt=320, new_tokens=20, models=("llama",))
    assert not rows[-1]["ok"] and rows[-1].get("mismatches", 0) > 0, rows[-1]


def test_selftest_reports_a_corrupted_recall(monkeypatch):
    """A recall that copies the wrong chunk rows is caught (and the exit status says so)."""
    import lsa_rewrite.runtime.mover as mover

    real = mover._copy

    def shifted(dst_k, dst_v, src_k, src_v, dst_rows, src_rows):
        if src_k.dim() == 5:  # mirror -> pool: recall the next chunk instead
            src_rows = torch.where(src_rows >= 0, (src_rows + 1) % (src_k.shape[0] * src_k.shape[1]), src_rows)
        real(dst_k, dst_v, src_k, src_v, dst_rows, src_rows)

    monkeypatch.setattr(mover, "_copy", shifted)
    rows = selftest.run("cpu", prompt=320, new_tokens=20, models=("llama",))
    assert not all(r["ok"] for r in rows[1:])
    assert any(r.get("recall_mismatches", 0) > 0 for r in rows[1:])


def test_selftest_gpu_flag_without_cuda_is_refused(capsys):
    if torch.cuda.is_available():
        return
    assert selftest.main(["--gpu"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
