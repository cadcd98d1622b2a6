// y[t, row_base + r] = w[r, :] . x[t, :] for float32 weights [rows, cols].
struct Params {
  rows: u32, cols: u32, n_tokens: u32, x_off: u32,
  x_stride: u32, y_off: u32, y_stride: u32, row_base: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> part: array<f32, 512>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = wg.x + wg.y * nwg.x;
  if (r >= p.rows) { return; }
  for (var t0 = 0u; t0 < p.n_tokens; t0 += 8u) {
    let nt = min(8u, p.n_tokens - t0);
    var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (var j = lid; j < p.cols; j += 64u) {
      let wv = w[r * p.cols + j];
      for (var t = 0u; t < nt; t++) { acc[t] += wv * x[p.x_off + (t0 + t) * p.x_stride + j]; }
    }
    for (var t = 0u; t < 8u; t++) { part[t * 64u + lid] = acc[t]; }
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride = stride >> 1u) {
      if (lid < stride) {
        for (var t = 0u; t < 8u; t++) { part[t * 64u + lid] += part[t * 64u + lid + stride]; }
      }
      workgroupBarrier();
    }
    if (lid < nt) { y[p.y_off + (t0 + lid) * p.y_stride + p.row_base + r] = part[lid * 64u]; }
    workgroupBarrier();
  }
}
