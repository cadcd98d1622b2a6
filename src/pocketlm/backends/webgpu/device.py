"""One wgpu device: buffers, the WGSL kernels, and the recording of a forward pass.

Every dispatch of a forward pass goes into one compute pass of one command encoder; `finish`
writes the step inputs (token ids, first position), submits that one command buffer and maps back
only the bytes asked for (the logits). Activations live in an arena of scratch buffers handed out
in call order and reused by the next pass, so once a pass of a given shape has run, the next one
allocates nothing: the same buffers, bind groups and parameter blocks are looked up again.

`trace`, when a list, receives each dispatch as (kernel, parameter bytes, buffer ids, workgroups):
the plan that `web.export` writes for the browser, which replays it with the same kernels.
"""

from __future__ import annotations

import functools
import math
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib.resources import files

import numpy as np

from ...errors import UnsupportedError

WORKGROUP = 64
MAX_GROUPS = 65535  # per grid dimension
STEP_HEADER = 2  # step buffer: [first position, n_tokens, ids...]


@dataclass(eq=False)
class Buffer:
    id: int
    gpu: object  # wgpu.GPUBuffer
    size: int  # bytes
    role: str  # "weight", "cache", "scratch", "step", "data"
    data: np.ndarray | None = None  # initial contents kept for export (weights, tables)
    filled_by: int | None = None  # readback buffers: the submission that copies into it
    # scratch buffers: the pass that last took it, and how many tensors of that pass still hold it
    pass_number: int = -1
    users: int = 0


def _native_calls():
    """wgpu-native's C entry points through wgpu-py's own cffi binding, for the things its Python
    layer costs most: encoding a replayed pass (a wrapper call per command, several us each),
    waiting for one submission (its map_sync polls until every queued submission is done, so a
    read of step N also waits for step N + 1), and making a bind group (a first prompt makes
    hundreds; wgpu-py's structs cost about 0.3 ms each). None when this wgpu-py has no such binding
    (the public calls are used instead)."""
    names = (
        "wgpuDeviceCreateBindGroup",
        "wgpuQueueSubmitForIndex",
        "wgpuDevicePoll",
        "wgpuComputePassEncoderSetPipeline",
        "wgpuComputePassEncoderSetBindGroup",
        "wgpuComputePassEncoderDispatchWorkgroups",
    )
    try:
        from wgpu.backends.wgpu_native._api import ffi, libf

        for c_type in (
            "WGPUSubmissionIndex *",
            "WGPUCommandBuffer[]",
            "WGPUBindGroupEntry[]",
            "WGPUBindGroupDescriptor *",
        ):
            ffi.typeof(c_type)
        if not all(hasattr(libf, n) for n in names):
            return None
    except Exception:  # another wgpu-py: its public calls
        return None
    return ffi, libf


_INCLUDE = re.compile(r"^#include (\w+)$", re.M)
_DIRECTIVE = re.compile(r"^\s*#(if|elif|else|endif)\b\s*(\w*)\s*$")


@functools.cache
def wgsl_source(kernel: str) -> str:
    """A kernel's WGSL. `kernel` is a file of wgsl/ or a variant of one, "linear+int4+one": the file
    with each `#include NAME` line replaced by wgsl/NAME.wgsl (functions that several kernels share)
    and only the lines that its `#if NAME` / `#elif NAME` / `#else` / `#endif` blocks keep for the
    names after the "+" (WGSL has neither; a variant carries no code it cannot run)."""
    name, *defines = kernel.split("+")
    text = (files(__package__) / "wgsl" / f"{name}.wgsl").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: wgsl_source(m.group(1)), _select(text, set(defines), kernel))


def _select(text: str, defines: set[str], kernel: str) -> str:
    lines, stack = [], []  # per open #if: [this branch kept, a branch already taken]
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        match = _DIRECTIVE.match(line)
        if match is None:
            if all(kept for kept, _ in stack):
                lines.append(line)
            continue
        word, arg = match.groups()
        if word == "if":
            taken = arg in defines
            stack.append([taken, taken])
        elif not stack:
            raise ValueError(f"kernel {kernel}: #{word} without #if at line {number}")
        elif word == "elif":
            taken = arg in defines and not stack[-1][1]
            stack[-1][0], stack[-1][1] = taken, stack[-1][1] or taken
        elif word == "else":
            stack[-1][0], stack[-1][1] = not stack[-1][1], True
        else:
            stack.pop()
    if stack:
        raise ValueError(f"kernel {kernel}: #if without #endif")
    return "".join(lines)


_FIELD = re.compile(r"(\w+)\s*:\s*(u32|i32|f32)")


@functools.cache
def param_fields(kernel: str) -> tuple[tuple[str, str], ...]:
    """(name, type) of each field of a kernel's `struct Params`, in the order the WGSL declares them."""
    match = re.search(r"struct Params\s*\{(.*?)\}", wgsl_source(kernel), re.S)
    if match is None:
        raise ValueError(f"kernel {kernel}: no struct Params")
    return tuple(_FIELD.findall(match.group(1)))


def pack_params(kernel: str, values: dict) -> list:
    """A kernel's parameters by field name, in its struct's order and types (padding fields `pad*` are
    0). A name the struct lacks, or a field left unset, is an error: never a silently shifted value."""
    fields = param_fields(kernel)
    unknown = set(values) - {name for name, _ in fields}
    missing = [name for name, _ in fields if name not in values and not name.startswith("pad")]
    if unknown or missing:
        raise ValueError(f"kernel {kernel}: unknown parameters {sorted(unknown)}, unset {missing}")
    return [
        float(values.get(name, 0)) if field_type == "f32" else int(values.get(name, 0))
        for name, field_type in fields
    ]


@functools.cache
def wgsl_constants(kernel: str, prefix: str) -> dict[str, int]:
    """`const PREFIX_NAME: u32 = Nu;` declarations of a kernel, as {"name": N} (the op codes its
    switch takes: one table, in the WGSL)."""
    found = re.findall(rf"const {prefix}_(\w+)\s*:\s*u32\s*=\s*(\d+)u\s*;", wgsl_source(kernel))
    return {name.lower(): int(value) for name, value in found}


_BINDING = re.compile(r"@binding\((\d+)\)\s*var<(uniform|storage,\s*read_write|storage,\s*read|storage)>")
_BINDING_TYPE = {
    "uniform": "uniform",
    "read": "read-only-storage",
    "read_write": "storage",
    "storage": "read-only-storage",
}


@functools.cache
def binding_types(kernel: str) -> tuple[str, ...]:
    """WebGPU's buffer binding type ("uniform", "read-only-storage", "storage") of each binding of a
    kernel, in order: its bind group layout, written out rather than derived from what the code uses,
    so that a variant which leaves a buffer unread still takes the same buffers."""
    found = {
        int(n): _BINDING_TYPE[binding_type.replace(" ", "").split(",")[-1]]
        for n, binding_type in _BINDING.findall(wgsl_source(kernel))
    }
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"kernel {kernel}: bindings {sorted(found)} are not 0..n-1")
    return tuple(found[i] for i in range(len(found)))


def grid(n_groups: int) -> tuple[int, int, int]:
    """Workgroups for n_groups, folded into two dimensions beyond the per-dimension limit."""
    n_groups = max(1, n_groups)
    if n_groups <= MAX_GROUPS:
        return n_groups, 1, 1
    return MAX_GROUPS, math.ceil(n_groups / MAX_GROUPS), 1


def _quick_cffi_types() -> None:
    """wgpu-py asks cffi for each C type it builds by name (`ffi.new("WGPUFoo *")`), and cffi parses
    every such name with a preamble declaring all of the binding's ~450 typedefs: ~80 ms a type,
    2 s of a model's start. Only the typedefs that the parsed text names can change its parse (the
    comment in cffi's own `Parser._parse` says as much), so the preamble is cut to those. Applied once;
    left out where cffi's parser is not the one this was written against."""
    try:
        from cffi import cparser
    except ImportError:
        return
    parse = getattr(cparser.Parser, "_parse", None)
    words = getattr(cparser, "_r_words", None)
    if parse is None or words is None or getattr(parse, "quick", False):
        return

    @functools.wraps(parse)
    def quick(self, csource):
        declared = getattr(self, "_declarations", None)
        if not isinstance(declared, dict):
            return parse(self, csource)
        named = set(words.findall(csource))
        self._declarations = {
            k: v for k, v in declared.items() if not k.startswith("typedef ") or k[8:] in named
        }
        try:
            return parse(self, csource)
        finally:
            self._declarations = declared

    quick.quick = True
    cparser.Parser._parse = quick


class Device:
    def __init__(self):
        _quick_cffi_types()
        try:
            import wgpu
        except ImportError:
            raise UnsupportedError("the webgpu backend needs wgpu-py: pip install wgpu") from None
        self.wgpu = wgpu
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
        if adapter is None:
            raise UnsupportedError(
                "no WebGPU adapter found (wgpu found no Vulkan, Metal, D3D12 or GL device)"
            )
        names = ("max-storage-buffer-binding-size", "max-buffer-size", "max-storage-buffers-per-shader-stage")
        self.device = adapter.request_device_sync(required_limits={n: adapter.limits[n] for n in names})
        self.adapter_info = dict(adapter.info)
        self.max_binding = int(adapter.limits["max-storage-buffer-binding-size"])
        self.buffers: list[Buffer] = []
        self.trace: list | None = None
        self._pipelines: dict[str, object] = {}
        self._layouts: dict[str, object] = {}  # each kernel's bind group layout
        self._compiling: dict[str, Future] = {}  # pipelines compiling on background threads
        self._compiler: ThreadPoolExecutor | None = None
        self._params: dict[tuple, Buffer] = {}
        self.generation = 0  # bumped whenever a buffer that recorded passes bind is replaced
        self.commands: list | None = None  # when a list, receives (pipeline, bind group, workgroups)
        self._bind_groups: dict[tuple, object] = {}
        self._arena: list[Buffer] = []
        self._free: dict[int, list[Buffer]] = {}  # the arena's free buffers, by size
        self._released: list[Buffer] = []  # freed since the last `scratch`
        self.pass_number = 0  # passes submitted: a scratch buffer taken in an earlier one is free
        self._encoder = self._pass = None
        self._readback: Buffer | None = None
        self._native = _native_calls() if hasattr(self.device, "_internal") else None
        if self._native is not None:  # wgpu-py's object for a bind group made through `_native`
            from wgpu.backends.wgpu_native import GPUBindGroup as native_group

            self._native_group = native_group
        self.step = self.buffer(4 * (STEP_HEADER + 4096), "step")
        self.step_values = np.zeros(STEP_HEADER, np.uint32)

    @property
    def description(self) -> str:
        info = self.adapter_info
        return f"{info.get('device') or info.get('description')} ({info.get('backend_type')}, {info.get('adapter_type')})"

    # -- buffers --------------------------------------------------------------------------------

    def buffer(self, size: int, role: str, data: np.ndarray | None = None, keep: bool = False) -> Buffer:
        usage = self.wgpu.BufferUsage
        flags = usage.STORAGE | usage.COPY_DST | usage.COPY_SRC
        size = max(16, (size + 15) // 16 * 16)
        if data is not None:
            raw = np.ascontiguousarray(data).view(np.uint8).ravel()
            if raw.size != size:  # padded to whole 16 bytes (most weights already are: no copy)
                raw = np.concatenate([raw, np.zeros(size - raw.size, np.uint8)])
            gpu = self.device.create_buffer_with_data(data=raw, usage=flags)
        else:
            gpu = self.device.create_buffer(size=size, usage=flags)
        buf = Buffer(len(self.buffers), gpu, size, role, data if keep else None)
        self.buffers.append(buf)
        return buf

    def scratch(self, n_floats: int, fresh: bool = False) -> Buffer:
        """An arena buffer of at least n_floats that no tensor of this pass holds any more (its
        contents are valid until the pass is finished; `GpuTensor` counts the holders and `release`s
        it): the smallest free one that fits, else a new one. A pass's tensors so share what is live
        at once, not one buffer each (a 512-token prompt took 1.1 GB for SmolLM2 that way). `fresh`:
        one no tensor of this pass has held, for rows the host writes before the pass runs."""
        size = 1 << (4 * max(n_floats, 4) - 1).bit_length()
        while self._released:  # (a tensor's __del__ may run at any allocation: it only appends)
            buf = self._released.pop()
            self._free.setdefault(buf.size, []).append(buf)
        for bucket in sorted(b for b in self._free if b >= size):
            free = self._free[bucket]
            for j in range(len(free) - 1, -1, -1):
                if free[j].pass_number != self.pass_number or not fresh:
                    buf = free.pop(j)
                    buf.pass_number, buf.users = self.pass_number, 0
                    return buf
        buf = self.buffer(size, "scratch")
        self._arena.append(buf)
        buf.pass_number, buf.users = self.pass_number, 0
        return buf

    def release(self, buf: Buffer) -> None:
        """A scratch buffer that no tensor of this pass holds any more: free for the pass's next."""
        self._released.append(buf)

    def params(self, values: list) -> Buffer:
        """A uniform block of u32 / f32 fields (Python ints / floats), made once per contents."""
        key = tuple(values)
        if key not in self._params:
            raw = b"".join(
                np.float32(v).tobytes() if isinstance(v, float) else np.uint32(v).tobytes() for v in values
            )
            self._params[key] = self.uniform(raw)
        return self._params[key]

    def uniform(self, raw: bytes) -> Buffer:
        """A uniform buffer holding `raw` (padded to 16 bytes)."""
        raw += b"\0" * (-len(raw) % 16)
        usage = self.wgpu.BufferUsage
        gpu = self.device.create_buffer_with_data(data=raw, usage=usage.UNIFORM | usage.COPY_DST)
        buf = Buffer(len(self.buffers), gpu, len(raw), "params", np.frombuffer(raw, np.uint8))
        self.buffers.append(buf)
        return buf

    # -- dispatch -------------------------------------------------------------------------------

    def precompile(self, kernels) -> None:
        """Start compiling `kernels` on background threads (a driver compiles each pipeline on the
        CPU, hundreds of ms for the larger ones): what would otherwise hold up the first pass is
        done while the weights upload. `pipeline` waits for one still compiling."""
        if self._compiler is None:
            self._compiler = ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) - 1)))
        for kernel in kernels:
            if kernel not in self._pipelines and kernel not in self._compiling:
                self._compiling[kernel] = self._compiler.submit(self._compile, kernel)

    def _compile(self, kernel: str, code: str | None = None, bindings: tuple[str, ...] | None = None):
        """(bind group layout, pipeline) of a kernel of wgsl/, or of `code` with `bindings` given."""
        module = self.device.create_shader_module(code=code if code is not None else wgsl_source(kernel))
        entries = [
            {"binding": i, "visibility": self.wgpu.ShaderStage.COMPUTE, "buffer": {"type": binding_type}}
            for i, binding_type in enumerate(bindings if bindings is not None else binding_types(kernel))
        ]
        layout = self.device.create_bind_group_layout(entries=entries)
        pipeline = self.device.create_compute_pipeline(
            layout=self.device.create_pipeline_layout(bind_group_layouts=[layout]),
            compute={"module": module, "entry_point": "main"},
        )
        return layout, pipeline

    def pipeline(self, kernel: str, code: str | None = None, bindings: tuple[str, ...] | None = None):
        """A kernel's compute pipeline, made once (a web package's kernels come with their `code`
        and `bindings`)."""
        if kernel not in self._pipelines:
            future = self._compiling.pop(kernel, None)
            layout, pipeline = (
                future.result() if future is not None else self._compile(kernel, code, bindings)
            )
            self._layouts[kernel], self._pipelines[kernel] = layout, pipeline
        return self._pipelines[kernel]

    def bind(self, kernel: str, bound: list[Buffer]):
        """The bind group of `bound` (parameter block first) for a kernel, made once."""
        key = (kernel, *(b.id for b in bound))
        group = self._bind_groups.get(key)
        if group is None and self._native is not None:
            ffi, libf = self._native
            entries = ffi.new("WGPUBindGroupEntry[]", len(bound))  # zeroed: no sampler, no texture
            for i, b in enumerate(bound):
                entries[i].binding, entries[i].buffer, entries[i].size = i, b.gpu._internal, b.size
            descriptor = ffi.new("WGPUBindGroupDescriptor *")  # zeroed: no label
            descriptor.layout = self._layouts[kernel]._internal
            descriptor.entryCount, descriptor.entries = len(bound), entries
            made = libf.wgpuDeviceCreateBindGroup(self.device._internal, descriptor)
            group = self._bind_groups[key] = self._native_group("", made, self.device)
        elif group is None:
            entries = [
                {"binding": i, "resource": {"buffer": b.gpu, "offset": 0, "size": b.size}}
                for i, b in enumerate(bound)
            ]
            group = self.device.create_bind_group(layout=self._layouts[kernel], entries=entries)
            self._bind_groups[key] = group
        return group

    def dispatch(
        self, kernel: str, params: dict, buffers: list[Buffer], groups: tuple[int, int, int]
    ) -> None:
        """Run `kernel` with its `struct Params` fields by name (see pack_params) over `buffers`."""
        pipeline = self.pipeline(kernel)
        bound = [self.params(pack_params(kernel, params)), *buffers]
        group = self.bind(kernel, bound)
        if self._pass is None:
            self._encoder = self.device.create_command_encoder()
            self._pass = self._encoder.begin_compute_pass()
        self._pass.set_pipeline(pipeline)
        self._pass.set_bind_group(0, group)
        self._pass.dispatch_workgroups(*groups)
        if self.trace is not None:
            self.trace.append((kernel, bound[0].id, [b.id for b in buffers], groups))
        if self.commands is not None:
            self.commands.append((pipeline, group, groups))

    def replay(self, commands: list) -> None:
        """Encode recorded (pipeline, bind group, workgroups) again, as the browser runtime does."""
        if self._pass is None:
            self._encoder = self.device.create_command_encoder()
            self._pass = self._encoder.begin_compute_pass()
        compute, last = self._pass, None
        if self._native is not None:  # the same three calls, without wgpu-py's wrappers
            ffi, libf = self._native
            encoder = compute._internal
            for pipeline, group, groups in commands:
                if pipeline is not last:
                    libf.wgpuComputePassEncoderSetPipeline(encoder, pipeline._internal)
                    last = pipeline
                libf.wgpuComputePassEncoderSetBindGroup(encoder, 0, group._internal, 0, ffi.NULL)
                libf.wgpuComputePassEncoderDispatchWorkgroups(encoder, *groups)
            return
        for pipeline, group, groups in commands:
            if pipeline is not last:
                compute.set_pipeline(pipeline)
                last = pipeline
            compute.set_bind_group(0, group)
            compute.dispatch_workgroups(*groups)

    def encode_ahead(self, commands: list) -> tuple:
        """Recorded commands encoded now into a pass of their own, for `adopt` to submit later (or
        never: an encoder left unsubmitted does nothing), while the GPU runs what is submitted."""
        held = self._encoder, self._pass
        self._encoder = self._pass = None
        try:
            self.replay(commands)
            return self._encoder, self._pass
        finally:
            self._encoder, self._pass = held

    def adopt(self, ahead: tuple) -> bool:
        """A pass from `encode_ahead` becomes the one being recorded, unless one is open already."""
        if self._pass is not None:
            return False
        self._encoder, self._pass = ahead
        return True

    def set_step(self, first_position: int, ids: np.ndarray) -> None:
        """The inputs of the pass being recorded (written to the step buffer at submission)."""
        values = np.concatenate([[first_position, len(ids)], ids]).astype(np.uint32)
        if values.nbytes > self.step.size:  # a longer prompt than any before
            self.step = self.buffer(values.nbytes * 2, "step")
            self._bind_groups.clear()
            self.generation += 1
        self.step_values = values

    def finish(self, read: Buffer | None = None, offset: int = 0, nbytes: int = 0) -> np.ndarray | None:
        """Submit the recorded pass (one command buffer); return `nbytes` of `read` from `offset`."""
        if read is None:
            self.submit()
            return None
        if self._readback is None or self._readback.size < nbytes:
            self._readback = self.readback_buffer(max(nbytes, 4096))
        self.submit([(read, offset, self._readback, nbytes)])
        return self.read(self._readback, nbytes)

    def readback_buffer(self, size: int) -> Buffer:
        usage = self.wgpu.BufferUsage
        return Buffer(
            -1, self.device.create_buffer(size=size, usage=usage.MAP_READ | usage.COPY_DST), size, "readback"
        )

    def submit(self, copies: list[tuple] = (), write_step: bool = True) -> None:
        """Submit the recorded pass, then copies (src, offset, readback buffer, nbytes) after it;
        the step buffer is written from the host first unless the GPU itself advanced it."""
        if write_step:
            self.device.queue.write_buffer(self.step.gpu, 0, self.step_values)
        if self._encoder is None:
            self._encoder = self.device.create_command_encoder()
        if self._pass is not None:
            self._pass.end()
        for src, offset, dst, nbytes in copies:
            self._encoder.copy_buffer_to_buffer(src.gpu, offset, dst.gpu, 0, nbytes)
        commands = self._encoder.finish()
        index = None
        if self._native is not None:
            ffi, libf = self._native
            queue = self.device.queue._internal
            index = libf.wgpuQueueSubmitForIndex(
                queue, 1, ffi.new("WGPUCommandBuffer[]", [commands._internal])
            )
        else:
            self.device.queue.submit([commands])
        for _, _, dst, _ in copies:
            dst.filled_by = index
        self._encoder = self._pass = None
        self.pass_number += 1  # the next pass: every scratch buffer free again
        self._free, self._released = {}, []
        for buf in self._arena:
            self._free.setdefault(buf.size, []).append(buf)

    def read(self, readback: Buffer, nbytes: int) -> np.ndarray:
        """The first bytes of a readback buffer, once the submission that fills it has run (not
        waiting for those queued after it, where the submission is known)."""
        if readback.filled_by is not None and self._native is not None:
            ffi, libf = self._native
            device = self.device._internal
            libf.wgpuDevicePoll(device, True, ffi.new("WGPUSubmissionIndex *", readback.filled_by))
            # Its submission is done, so the map resolves at the next poll: polled here too, since
            # wgpu-py's poll thread may already be blocked in a poll that waits for the whole queue.
            promise = readback.gpu.map_async(self.wgpu.MapMode.READ, 0, nbytes)
            for _ in range(64):
                if getattr(promise, "_state", "") != "pending":
                    break
                libf.wgpuDevicePoll(device, False, ffi.NULL)
            promise.sync_wait()
        else:
            readback.gpu.map_sync(self.wgpu.MapMode.READ, 0, nbytes)
        data = np.frombuffer(readback.gpu.read_mapped(0, nbytes), np.uint8).copy()
        readback.gpu.unmap()
        return data

    def concatenate(self, parts: list[Buffer], sizes: list[int], data: np.ndarray | None = None) -> Buffer:
        """One new buffer holding the first `sizes[i]` bytes of each part in order (copied on the
        GPU), which replaces the parts: they are destroyed, and recorded passes recorded again."""
        whole = self.buffer(sum(sizes), parts[0].role)
        whole.data = data
        encoder = self.device.create_command_encoder()
        at = 0
        for part, size in zip(parts, sizes):
            encoder.copy_buffer_to_buffer(part.gpu, 0, whole.gpu, at, size)
            at += size
        self.device.queue.submit([encoder.finish()])
        self.free(parts)
        return whole

    def free(self, buffers: list[Buffer]) -> None:
        """Destroy buffers that something else replaces (recorded passes are recorded again)."""
        for b in buffers:
            b.gpu.destroy()
            b.role, b.data = "freed", None
        self._bind_groups.clear()
        self.generation += 1

    def copy(self, src: Buffer, dst: Buffer) -> None:
        """Copy a whole buffer in a command buffer of its own (session clones)."""
        encoder = self.device.create_command_encoder()
        encoder.copy_buffer_to_buffer(src.gpu, 0, dst.gpu, 0, min(src.size, dst.size))
        self.device.queue.submit([encoder.finish()])
