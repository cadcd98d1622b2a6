// Statistics of each row of `dim` values, one workgroup per row (Gemma 3n):
//   rows+match: y = x * sqrt(mean(other^2)) / sqrt(max(mean(x^2), 1e-5)), other's rows `other_dim` long
//   rows+topk:  y = max(x - (mean + k * std), 0), the variance divided by dim - ddof
struct Params { n_rows: u32, dim: u32, x_off: u32, y_off: u32, other_off: u32, other_dim: u32, k: f32, ddof: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> other: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> part: array<f32, 64>;
#include row_sum

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let row = wg.x + wg.y * nwg.x;
  if (row >= p.n_rows) { return; }
  let base = p.x_off + row * p.dim;
  let dst = p.y_off + row * p.dim;
#if match
  var sx = 0.0;
  for (var j = lid; j < p.dim; j += 64u) { let v = x[base + j]; sx += v * v; }
  var so = 0.0;
  let ob = p.other_off + row * p.other_dim;
  for (var j = lid; j < p.other_dim; j += 64u) { let v = other[ob + j]; so += v * v; }
  let scale = sqrt(row_sum(lid, so) / f32(p.other_dim)) / sqrt(max(row_sum(lid, sx) / f32(p.dim), 1e-5));
  for (var j = lid; j < p.dim; j += 64u) { y[dst + j] = x[base + j] * scale; }
#elif topk
  var s = 0.0;
  for (var j = lid; j < p.dim; j += 64u) { s += x[base + j]; }
  let mean = row_sum(lid, s) / f32(p.dim);
  var d = 0.0;
  for (var j = lid; j < p.dim; j += 64u) { let v = x[base + j] - mean; d += v * v; }
  let cutoff = mean + p.k * sqrt(row_sum(lid, d) / f32(p.dim - p.ddof));
  for (var j = lid; j < p.dim; j += 64u) { y[dst + j] = max(x[base + j] - cutoff, 0.0); }
#endif
}
