"""llama.cpp (llama-cpp-python, the `llamacpp` extra) as the peer our tests and benchmarks compare with
(here, not in the package: pocketlm itself never runs llama.cpp)."""

from __future__ import annotations

import os


def peak_rss_mb() -> float:
    """The peer process's peak resident memory (VmHWM), read without importing pocketlm: its numba
    and LLVM would add about 80 MB to the peer's figure."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def open_llama(path: str | os.PathLike, repack: bool = True, **options):
    """`llama_cpp.Llama(path, **options)`; `repack=False` loads it without its repacked weight
    buffers (llama-cpp-python 0.3.36 segfaults in them on Xeons with AMX, on the released models'
    files and on 64-wide test matrices alike). Llama takes no option for it, so its default model
    parameters are patched for the one load."""
    import llama_cpp

    if repack:
        return llama_cpp.Llama(str(path), **options)
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(str(path), **options)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params
