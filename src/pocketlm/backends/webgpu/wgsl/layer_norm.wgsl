// y[row] = (x[row] - mean) / sqrt(var + eps) * w (+ b): one workgroup per row of `dim` values. The
// weight and bias hold w_rows rows of `dim` (per-head norms: one per head), row r uses r % w_rows.
struct Params { n_rows: u32, dim: u32, x_off: u32, y_off: u32, has_bias: u32, eps: f32, w_rows: u32, pad0: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> part: array<f32, 64>;
#include row_sum

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let row = wg.x + wg.y * nwg.x;
  if (row >= p.n_rows) { return; }
  let base = p.x_off + row * p.dim;
  var sum = 0.0;
  for (var j = lid; j < p.dim; j += 64u) { sum += x[base + j]; }
  let mean = row_sum(lid, sum) / f32(p.dim);
  var sq = 0.0;
  for (var j = lid; j < p.dim; j += 64u) { let d = x[base + j] - mean; sq += d * d; }
  let inv = 1.0 / sqrt(row_sum(lid, sq) / f32(p.dim) + p.eps);
  let wb = (row % p.w_rows) * p.dim;
  for (var j = lid; j < p.dim; j += 64u) {
    var v = (x[base + j] - mean) * inv * w[wb + j];
    if (p.has_bias == 1u) { v = v + b[wb + j]; }
    y[p.y_off + row * p.dim + j] = v;
  }
}
