"""WebGPU backend (wgpu-py): the op set in WGSL kernels, for GPUs and the browser."""

from .backend import GpuTensor, WebGPUBackend

__all__ = ["GpuTensor", "WebGPUBackend"]
