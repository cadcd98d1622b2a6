"""The decode kernels alone: one matrix-vector product per weight layout at the real models'
shapes, timed in this process for the kernel path it runs (POCKETLM_CPU_ISA forces one).

Two sizes per layout: one layer's matrix (in cache after the first call: the kernel's own speed)
and a stack of them as large as a model (read from DRAM each call: memory and kernel together).
Prints GB/s of weight bytes read and Gweights/s; medians of many calls.

    NUMBA_NUM_THREADS=2 python benchmarks/kernels_bench.py
    for p in avx2 portable; do POCKETLM_CPU_ISA=$p NUMBA_NUM_THREADS=2 python benchmarks/kernels_bench.py; done
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from pocketlm.formats.quants import BLOCK_LAYOUT, GGMLType, quantize
from pocketlm.kernels import blocks, int4, int8, intdot

# (layout, GGUF type, rows, cols): SmolLM2-135M's gate/up and Gemma 3 270M's
CASES = [
    ("nibbles", GGMLType.Q4_1, 3072, 576),
    ("Q8_0 blocks", GGMLType.Q8_0, 3072, 576),
    ("Q5_0 blocks", GGMLType.Q5_0, 4096, 640),
    ("int8 (Q6_K)", GGMLType.Q6_K, 640, 2048),
]
DRAM_BYTES = 96 << 20  # the large size: about this many bytes of weights


def random_matrix(tensor_type: GGMLType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    block_size, block_bytes = BLOCK_LAYOUT[tensor_type]
    if tensor_type == GGMLType.Q6_K:  # random bytes, the f16 scale (last) finite
        data = rng.integers(0, 256, (rows * cols // block_size, block_bytes), dtype=np.uint8)
        data[:, -2:] = rng.uniform(-0.01, 0.01, (len(data), 1)).astype("<f2").view(np.uint8)
        return data.reshape(rows, -1)
    values = rng.standard_normal((rows * cols // block_size, block_size))
    return quantize(values.astype(np.float32), tensor_type).reshape(rows, -1)


def weight(tensor_type: GGMLType, rows: int, cols: int):
    data = random_matrix(tensor_type, rows, cols)
    if blocks.fits(tensor_type, (rows, cols)):
        return blocks.wrap(data, tensor_type, (rows, cols))
    return (int4 if int4.fits(tensor_type, (rows, cols)) else int8).repack(data, tensor_type, (rows, cols))


def timed(w, x, calls: int) -> float:
    w.matvec(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        w.matvec(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(
        f"kernel path: {getattr(intdot, 'ISA', None) or ('VNNI512' if getattr(intdot, 'VNNI512', False) else 'portable')}"
    )
    print(f"{'layout':<14}{'shape':>14}{'MB':>8}{'us':>10}{'GB/s':>8}{'Gw/s':>8}")
    for name, tensor_type, rows, cols in CASES:
        for stacked in (1, max(1, DRAM_BYTES // (rows * cols))):
            w = weight(tensor_type, rows * stacked, cols)
            x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
            seconds = timed(w, x, 400 if stacked == 1 else 20)
            shape = f"{rows * stacked}x{cols}"
            print(
                f"{name:<14}{shape:>14}{w.nbytes / 1e6:>8.1f}{seconds * 1e6:>10.0f}"
                f"{w.nbytes / seconds / 1e9:>8.1f}{rows * stacked * cols / seconds / 1e9:>8.1f}"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
