// Included by the kernels that reduce a row with one workgroup of 64: the sum of every
// invocation's `value` (called by the whole workgroup, in uniform control flow). The including
// kernel declares `var<workgroup> part: array<f32, N>`, N >= 64 (part[0 .. 64) is used).

fn row_sum(lid: u32, value: f32) -> f32 {
  part[lid] = value;
  workgroupBarrier();
  for (var stride = 32u; stride > 0u; stride = stride >> 1u) {
    if (lid < stride) { part[lid] += part[lid + stride]; }
    workgroupBarrier();
  }
  let total = part[0];
  workgroupBarrier();
  return total;
}
