"""Which byte dot product the decode kernels are built with, chosen at run time from the CPU.

Every path computes the same lanes (`kernels.intdot`): lane i of a step = the sum over k < 4 of
weight byte 4i+k times activation byte 4i+k. They differ in the instruction that does it:

| path | instruction | weights x activations |
|---|---|---|
| avx512vnni | `vpdpbusd` on 512 bits | unsigned x signed |
| avxvnni | `{vex} vpdpbusd` on 256 bits (AVX-VNNI; or AVX-512 VNNI with VL) | unsigned x signed |
| avx2 | `vpmaddubsw` then `vpmaddwd` by ones, 256 bits | small unsigned, or signed via `vpsignb` |
| i8mm | `usdot` (Armv8.6 I8MM), 128 bits | unsigned x signed |
| dotprod | `sdot` (Armv8.2 DotProd), 128 bits | signed x signed |
| portable | widen, multiply, add groups of 4 (plain LLVM vectors) | any |

`POCKETLM_CPU_ISA` forces a path (one this CPU can run), so each can be tested and timed anywhere.
"""

from __future__ import annotations

import os

import llvmlite.binding as llvm

from ..errors import InvalidOptionError

ENV = "POCKETLM_CPU_ISA"
# best first; each with the LLVM features it needs
REQUIRES = {
    "avx512vnni": ("avx512vnni", "avx512bw", "avx512f"),
    "avxvnni": ("avxvnni", "avx2"),
    "avx2": ("avx2",),
    "i8mm": ("i8mm", "neon"),
    "dotprod": ("dotprod", "neon"),
    "portable": (),
}
ISAS = tuple(REQUIRES)
# Paths whose product cannot take unsigned bytes up to 255 against signed ones: vpmaddubsw
# saturates pairs to int16 (255 x 127 x 2 > 32767), sdot is signed x signed. Int8 weights go to
# them signed, with no bias (kernels.intdot).
SIGNED_WEIGHTS = frozenset({"avx2", "dotprod"})


def _has(features: dict[str, bool], isa: str) -> bool:
    return all(features.get(f, False) for f in REQUIRES[isa])


def _normalized(features: dict[str, bool]) -> dict[str, bool]:
    """AArch64 has NEON everywhere and LLVM does not always list it, so `dotprod` / `i8mm` imply
    it; the 256-bit `vpdpbusd` is also there on AVX-512 VNNI CPUs with AVX512VL."""
    features = dict(features)
    if features.get("dotprod") or features.get("i8mm"):
        features["neon"] = True
    if _has(features, "avx512vnni") and features.get("avx512vl") and features.get("avx2"):
        features["avxvnni"] = True
    return features


def runs(features: dict[str, bool], isa: str) -> bool:
    """Whether a CPU with these LLVM features (`llvm.get_host_cpu_features()`) executes a path."""
    return _has(_normalized(features), isa)


def choose(features: dict[str, bool]) -> str:
    """The best path for a CPU with these LLVM features."""
    return next(isa for isa in ISAS if runs(features, isa))


def host_features() -> dict[str, bool]:
    """The features numba compiles for: the host's, or none when numba is told another CPU
    (NUMBA_CPU_NAME, as for a cache shared between machines)."""
    from numba.core import config

    if config.CPU_NAME not in (None, "host"):
        return {}
    return dict(llvm.get_host_cpu_features())


def selected() -> str:
    """The path for this process: $POCKETLM_CPU_ISA if set (checked against the CPU), else the best."""
    features = host_features()
    forced = os.environ.get(ENV, "").strip().lower()
    if not forced:
        return choose(features)
    if forced not in REQUIRES:
        raise InvalidOptionError(f"{ENV}={forced!r}: not a known path; choose one of {', '.join(ISAS)}")
    if not runs(features, forced):
        missing = [f for f in REQUIRES[forced] if not _normalized(features).get(f, False)]
        raise InvalidOptionError(
            f"{ENV}={forced}: this CPU lacks {', '.join(missing)}; it runs "
            f"{', '.join(i for i in ISAS if runs(features, i))}"
        )
    return forced


def for_this_process() -> tuple[str, str | None]:
    """`selected()` as the kernels are built at import: (the path, None), or with a bad
    $POCKETLM_CPU_ISA (the best path, the error), which `check` raises where a user's call can
    report it in one line (import time cannot)."""
    try:
        return selected(), None
    except InvalidOptionError as e:
        return choose(host_features()), str(e)


PATH, _PROBLEM = for_this_process()


def check() -> None:
    """Raise the error of a bad $POCKETLM_CPU_ISA, if there was one when the kernels were built."""
    if _PROBLEM:
        raise InvalidOptionError(_PROBLEM)
