// The output [T, Hq, D] of split attention: each split's sums scaled by exp(its maximum - the
// overall maximum), over the likewise scaled denominators. Splits that saw no key have l = 0.
struct Params { n_heads: u32, head_dim: u32, n_splits: u32, y_off: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let h = wg.x;
  let t = wg.y;
  let size = p.head_dim + 2u;
  let base = (t * p.n_heads + h) * p.n_splits * size;
  var m = -3.0e38;
  for (var s = 0u; s < p.n_splits; s++) {
    if (part[base + s * size + p.head_dim + 1u] > 0.0) { m = max(m, part[base + s * size + p.head_dim]); }
  }
  var l = 0.0;
  for (var s = 0u; s < p.n_splits; s++) {
    let ls = part[base + s * size + p.head_dim + 1u];
    if (ls > 0.0) { l += ls * exp(part[base + s * size + p.head_dim] - m); }
  }
  for (var d = lid; d < p.head_dim; d += 64u) {
    var sum = 0.0;
    for (var s = 0u; s < p.n_splits; s++) {
      let b = base + s * size;
      if (part[b + p.head_dim + 1u] > 0.0) { sum += part[b + d] * exp(part[b + p.head_dim] - m); }
    }
    y[p.y_off + (t * p.n_heads + h) * p.head_dim + d] = sum / l;
  }
}
