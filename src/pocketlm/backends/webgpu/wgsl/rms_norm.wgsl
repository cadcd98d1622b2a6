// y[row] = x[row] / sqrt(mean(x[row]^2) + eps) (* w) (+ res[row]: a residual added after the norm,
// Gemma's post-norms): one workgroup per row of `dim` values.
struct Params { n_rows: u32, dim: u32, x_off: u32, y_off: u32, has_weight: u32, eps: f32, has_res: u32, res_off: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> res: array<f32>;

var<workgroup> part: array<f32, 64>;
#include row_sum

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let row = wg.x + wg.y * nwg.x;
  if (row >= p.n_rows) { return; }
  let base = p.x_off + row * p.dim;
  var sum = 0.0;
  for (var j = lid; j < p.dim; j += 64u) { let v = x[base + j]; sum += v * v; }
  let inv = 1.0 / sqrt(row_sum(lid, sum) / f32(p.dim) + p.eps);
  for (var j = lid; j < p.dim; j += 64u) {
    var v = x[base + j] * inv;
    if (p.has_weight == 1u) { v = v * w[j]; }
    if (p.has_res == 1u) { v = v + res[p.res_off + row * p.dim + j]; }
    y[p.y_off + row * p.dim + j] = v;
  }
}
