"""Run one decode-attention case a few times, for a profiler (Nsight Compute) to attach to.

Builds the case exactly as ``decode_attention.py`` does (bf16, head dim 128, 13.5% resident in
64-token chunks) and calls ``lsa::sparse_decode_attention`` ``--calls`` times, then synchronizes.
It measures nothing itself; run it under ``ncu``, e.g.::

    ncu --clock-control none --kernel-name regex:_decode_ --launch-skip 4 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python3 benchmarks/profile_decode.py --layout mqa --batch 1 --context 131072
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attention import OPS, make_case  # noqa: E402

LAYOUTS = {"llama": (32, 8), "mqa": (32, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="mqa")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--calls", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this script needs a CUDA GPU")
    hq, hkv = LAYOUTS[args.layout]
    q, k_pool, v_pool, slot_chunk, pos, valid_start = make_case(args.batch, args.context, hq, hkv, 128)
    for _ in range(args.calls):
        OPS.sparse_decode_attention(q, k_pool, v_pool, slot_chunk, pos, valid_start, 128 ** -0.5, 0.0)
    torch.cuda.synchronize()
    print(f"{args.layout} B{args.batch} L{args.context}: {args.calls} calls done")


if __name__ == "__main__":
    main()
