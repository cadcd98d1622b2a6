"""LLVM IR building blocks for the kernels written as IR inside numba intrinsics (`intdot`,
`attention`): vector types and constants, loads at an element index of a numba array's data
pointer, a counted loop with values carried through it, and horizontal sums."""

from __future__ import annotations

from llvmlite import ir

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
FAST = ("fast",)  # float flags: reassociation and contraction allowed (fastmath)


def vec(t, n):
    return ir.VectorType(t, n)


def splat(t, n, value):
    return ir.Constant(vec(t, n), [value] * n)


def indices(values):
    return ir.Constant(vec(I32, len(values)), list(values))


def broadcast(builder, value, n):
    """<n x value>: a scalar LLVM value in every lane."""
    v = builder.insert_element(ir.Constant(vec(value.type, n), None), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(v.type, None), ir.Constant(vec(I32, n), [0] * n))


def prefetch_line(builder, address):
    """Ask for the cache line holding `address` (any pointer): to read, kept in all cache levels,
    data (`llvm.prefetch`); no effect on results."""
    i32 = ir.IntType(32)
    kind = ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32])
    fn = builder.module.declare_intrinsic("llvm.prefetch", [address.type], kind)
    builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


def const(value):
    return ir.Constant(I64, value)


def load(builder, data, index, typ, align=1):
    """Load a `typ` at element `index` of a numba array's data pointer."""
    return builder.load(builder.bitcast(builder.gep(data, [index]), typ.as_pointer()), align=align)


def store(builder, value, data, index, align=1):
    """Store `value` (any type) at element `index` of a numba array's data pointer."""
    builder.store(value, builder.bitcast(builder.gep(data, [index]), value.type.as_pointer()), align=align)


def declare(builder, name, result, operands):
    return builder.module.declare_intrinsic(name, (), ir.FunctionType(result, operands))


def fmul(builder, a, b):
    return builder.fmul(a, b, flags=FAST)


def fadd(builder, a, b):
    return builder.fadd(a, b, flags=FAST)


def counted_loop(builder, count, initial, body):
    """for i in range(count): values = body(builder, i, values); returns the final values
    (LLVM values, one phi each)."""
    entry = builder.block
    head, block, done = (builder.function.append_basic_block(f"loop.{n}") for n in ("head", "body", "done"))
    builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(I64)
    i.add_incoming(ir.Constant(I64, 0), entry)
    phis = []
    for value in initial:
        phis.append(builder.phi(value.type))
        phis[-1].add_incoming(value, entry)
    builder.cbranch(builder.icmp_unsigned("<", i, count), block, done)
    builder.position_at_end(block)
    updated = body(builder, i, phis)
    i.add_incoming(builder.add(i, ir.Constant(I64, 1)), builder.block)
    for phi, value in zip(phis, updated):
        phi.add_incoming(value, builder.block)
    builder.branch(head)
    builder.position_at_end(done)
    return phis


def horizontal_sum(builder, v, n):
    """The sum of the n lanes of float vector v."""
    while n > 1:
        n //= 2
        low = builder.shuffle_vector(v, v, indices(range(n)))
        high = builder.shuffle_vector(v, v, indices(range(n, 2 * n)))
        v = fadd(builder, low, high)
    return builder.extract_element(v, ir.Constant(I32, 0))


def emit_assembly(module: ir.Module, triple: str, cpu: str = "", features: str = "") -> str:
    """`module` compiled for a target (`"aarch64-unknown-linux-gnu"`, features `"+neon,+dotprod"`)
    as assembly: how tests check the paths this machine cannot run."""
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    machine = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=3)
    parsed = llvm.parse_assembly(str(module))
    parsed.verify()
    return machine.emit_assembly(parsed)
