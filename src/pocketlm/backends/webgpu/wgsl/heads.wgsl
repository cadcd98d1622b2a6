// Included by kernels that transform one attention head on the way (kv_write, attention): its
// values RMS-normed (norm 1; norm 2: times the weight nw from element w_off), then rotated by RoPE over the first
// n_dims (0: none) at a position, pairing d with d + n_dims/2 (neox) or 2i with 2i + 1, with the
// tables `cs`: cos [positions, n_dims / 2], then sin from element sin_off. The including kernel
// declares `hsrc` (the values), `nw` and `cs`. One workgroup of 64 threads per head.
var<workgroup> hv: array<f32, 512>;
var<workgroup> hsum: array<f32, 64>;

// hv[0..dim) = the head at hsrc[base..], normed as asked (call from uniform control flow)
fn head_load(base: u32, dim: u32, norm: u32, eps: f32, w_off: u32, lid: u32) {
  var sum = 0.0;
  for (var d = lid; d < dim; d += 64u) { let v = hsrc[base + d]; hv[d] = v; sum += v * v; }
  if (norm > 0u) {
    hsum[lid] = sum;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
      if (lid < s) { hsum[lid] += hsum[lid + s]; }
      workgroupBarrier();
    }
    let inv = 1.0 / sqrt(hsum[0] / f32(dim) + eps);
    for (var d = lid; d < dim; d += 64u) {
      var v = hv[d] * inv;
      if (norm == 2u) { v = v * nw[w_off + d]; }
      hv[d] = v;
    }
  }
  workgroupBarrier();
}

// value d of the loaded head, rotated for position pos
fn head_value(d: u32, pos: u32, n_dims: u32, neox: u32, sin_off: u32) -> f32 {
  let v = hv[d];
  if (d >= n_dims) { return v; }
  let half = n_dims / 2u;
  var k = d / 2u;
  if (neox == 1u) { k = d % half; }
  let c = cs[pos * half + k];
  let s = cs[sin_off + pos * half + k];
  if (neox == 1u) {
    if (d < half) { return v * c - hv[d + half] * s; }
    return v * c + hv[d - half] * s;
  }
  if (d % 2u == 0u) { return v * c - hv[d + 1u] * s; }
  return v * c + hv[d - 1u] * s;
}

// values d .. d + 3 of the loaded head, rotated for position pos
fn head_value4(d: u32, pos: u32, n_dims: u32, neox: u32, sin_off: u32) -> vec4<f32> {
  return vec4<f32>(head_value(d, pos, n_dims, neox, sin_off), head_value(d + 1u, pos, n_dims, neox, sin_off),
                   head_value(d + 2u, pos, n_dims, neox, sin_off), head_value(d + 3u, pos, n_dims, neox, sin_off));
}
