"""Memory intrinsics for the numba kernels: a software prefetch, and a load of an f16.

A decode step reads every weight once, from DRAM: as int8, SmolLM2's 165 MB and Gemma 3 270M's 314 MB
are far beyond the caches. On the development machine the int8 matvec read them at 6-7 GB/s
without help although two threads stream 17 GB/s: the hardware prefetcher does not run far
enough ahead of a loop that works on each row for a while. Asking for the row a few rows
ahead (`llvm.prefetch`) brought the kernel to 15-18 GB/s (SmolLM2's matrices in a row: 28.5 ms
a token without the prefetch, 10.1 ms with it; README, "Performance").

Indexing: inner loops that index a row at `base + j` index with unsigned integers
(`np.uint64(...)`). With a signed index numba adds a wrap-around for negative values, LLVM
cannot then prove the accesses consecutive, and it assembled the vectors byte by byte
(2.3 GB/s against 19 for the same loop with unsigned indices).
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

PREFETCH_BYTES = 2048  # how far ahead of the row being read its successors are requested
CACHE_LINE = 64


@intrinsic
def prefetch(typingctx, array, index):
    """Hint that `array[index]` (a 1-D array) will be read soon; no effect on results."""
    if not (isinstance(array, types.Array) and array.ndim == 1 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        address = builder.gep(data, [index])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [address.type], fnty)
        # read (0), keep in all cache levels (3), data cache (1)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@intrinsic
def load_f16(typingctx, array, index):
    """The float16 stored at byte `index` of a 1-D byte array, as a float32 (numba has no
    float16 type on the CPU; GGUF blocks keep their scales as f16, at any alignment)."""
    if not (isinstance(array, types.Array) and array.ndim == 1 and array.dtype.bitwidth == 8
            and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        # the bitcast keeps this valid for LLVM's typed pointers (numba 0.60) and opaque ones
        address = builder.bitcast(builder.gep(data, [index]), ir.HalfType().as_pointer())
        return builder.fpext(builder.load(address, align=1), ir.FloatType())

    return types.float32(array, index), codegen


@njit(inline="always")
def prefetch_row(matrix, r):
    """Request every cache line of row r of a 2-D array (nothing when r is past its end)."""
    if r < matrix.shape[0]:
        row = matrix[r]
        for i in range(0, row.size, max(1, CACHE_LINE // row.itemsize)):
            prefetch(row, i)
        if row.size:
            prefetch(row, row.size - 1)


def rows_ahead(row_bytes: int) -> int:
    """How many rows ahead to prefetch for rows of this many bytes."""
    return max(1, -(-PREFETCH_BYTES // max(row_bytes, 1)))
