"""Memory intrinsics for the numba kernels: a software prefetch, and a load of an f16.

A decode step reads every weight once, from DRAM. On Intel Xeons the hardware prefetcher does
not run far enough ahead of a loop that works on each row for a while, and asking for the row a
few rows ahead (`llvm.prefetch`) more than doubled the matvecs' speed; on AMD's Zen cores the
hardware keeps up by itself and the prefetch instructions only cost (`PREFETCH`; the figures are
in benchmarks/RESULTS.md).

Indexing: inner loops that index a row at `base + j` index with unsigned integers
(`np.uint64(...)`). With a signed index numba adds a wrap-around for negative values, LLVM
cannot then prove the accesses consecutive, and it assembled the vectors byte by byte
(2.3 GB/s against 19 for the same loop with unsigned indices).
"""

from __future__ import annotations

import ctypes
import mmap
import os

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .ir import counted_loop, prefetch_line

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
        prefetch_line(builder, builder.gep(data, [index]))
        return context.get_dummy_value()

    return types.void(array, index), codegen


@intrinsic
def load_f16(typingctx, array, index):
    """The float16 stored at byte `index` of a 1-D byte array, as a float32 (numba has no
    float16 type on the CPU; GGUF blocks keep their scales as f16, at any alignment)."""
    if not (
        isinstance(array, types.Array)
        and array.ndim == 1
        and array.dtype.bitwidth == 8
        and isinstance(index, types.Integer)
    ):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        # the bitcast keeps this valid for LLVM's typed pointers (numba 0.60) and opaque ones
        address = builder.bitcast(builder.gep(data, [index]), ir.HalfType().as_pointer())
        return builder.fpext(builder.load(address, align=1), ir.FloatType())

    return types.float32(array, index), codegen


@intrinsic
def prefetch_row(typingctx, matrix, r, ahead):
    """Request every cache line of row r + ahead of a 2-D array (nothing when ahead is 0 or the
    row is past its end). In IR: written in numba, the loop over the row's lines divided by the
    array's item size at run time, twice an array and row, which made a matvec over SmolLM2's
    576-wide rows a third slower even with its rows in cache (benchmarks/RESULTS.md)."""
    if not (
        isinstance(matrix, types.Array)
        and matrix.ndim == 2
        and isinstance(r, types.Integer)
        and isinstance(ahead, types.Integer)
    ):
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)  # intp: the kernels are built for 64-bit targets
        item_bytes = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        array = context.make_array(signature.args[0])(context, builder, args[0])
        row, later = (context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:]))
        n_rows, n_cols = cgutils.unpack_tuple(builder, array.shape, 2)
        row_stride = cgutils.unpack_tuple(builder, array.strides, 2)[0]
        target = builder.add(row, later)
        wanted = builder.and_(
            builder.icmp_signed(">", later, ir.Constant(i64, 0)), builder.icmp_signed("<", target, n_rows)
        )
        with builder.if_then(wanted):
            start = builder.gep(
                builder.bitcast(array.data, ir.IntType(8).as_pointer()), [builder.mul(target, row_stride)]
            )
            n_bytes = builder.mul(n_cols, ir.Constant(i64, item_bytes))

            def line(builder, i, _):
                prefetch_line(builder, builder.gep(start, [builder.mul(i, ir.Constant(i64, CACHE_LINE))]))
                return []

            lines = builder.udiv(
                builder.add(n_bytes, ir.Constant(i64, CACHE_LINE - 1)), ir.Constant(i64, CACHE_LINE)
            )
            counted_loop(builder, lines, [], line)
            last = builder.gep(start, [builder.sub(n_bytes, ir.Constant(i64, 1))])  # may be past the lines
            with builder.if_then(builder.icmp_signed(">", n_bytes, ir.Constant(i64, 0))):
                prefetch_line(builder, last)
        return context.get_dummy_value()

    return types.void(matrix, r, ahead), codegen


def _prefetch_pays() -> bool:
    """Whether the decode kernels prefetch: $POCKETLM_PREFETCH (0 or 1) if set, else on all but
    AMD's Zen cores, whose hardware prefetchers keep up with the row loop by themselves and where
    the prefetch instructions cost more than they bring (benchmarks/RESULTS.md)."""
    forced = os.environ.get("POCKETLM_PREFETCH", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return not llvm.get_host_cpu_name().startswith("znver")


PREFETCH = _prefetch_pays()


def rows_ahead(row_bytes: int) -> int:
    """How many rows ahead to prefetch for rows of this many bytes (0: no prefetch)."""
    return max(1, -(-PREFETCH_BYTES // max(row_bytes, 1))) if PREFETCH else 0


CODE_LIBRARY = "libllvmlite"  # LLVM, as llvmlite ships it (180 MB of code and tables)


def release_code_pages(library: str = CODE_LIBRARY) -> int:
    """Let go of the pages of LLVM's shared library that this process holds resident, and return
    how many bytes that was (0 where there is no /proc or madvise: not Linux).

    numba runs LLVM whenever it loads a kernel, even from its disk cache, and each load touches
    some 50 MB of LLVM's code, which then stays resident though no token runs any of it. Only
    mappings that can hold nothing but the file's bytes are released: not writable now, never
    writable (no `ac` flag: a relocated read-only segment was written once), no private page in
    memory or in swap, every one of those fields read. What runs again is paged back in from the
    file, as at start-up. (The pages stay in the system's page cache, reclaimable.)"""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    spans, current = [], None
    for line in lines:
        fields = line.split(None, 5)
        if not fields:
            continue
        if "-" in fields[0] and not fields[0].endswith(
            ":"
        ):  # a mapping's first line (its path may hold spaces)
            current = None
            path = fields[5].removesuffix(" (deleted)") if len(fields) > 5 else ""
            if os.path.basename(path).startswith(library) and "w" not in fields[1]:
                start, end = (int(a, 16) for a in fields[0].split("-"))
                current = {"span": (start, end - start)}
                spans.append(current)
        elif current is not None and fields[0] in ("Rss:", "Anonymous:", "Swap:", "VmFlags:"):
            current[fields[0]] = fields[1:] if fields[0] == "VmFlags:" else int(fields[1]) * 1024
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for span in spans:
        if (
            span.get("Anonymous:", 1)
            or span.get("Swap:", 1)
            or "ac" in " ".join(span.get("VmFlags:", ["ac"])).split()
        ):
            continue
        if span.get("Rss:") and madvise(*span["span"], mmap.MADV_DONTNEED) == 0:
            released += span["Rss:"]
    return released
