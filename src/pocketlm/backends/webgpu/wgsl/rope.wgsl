// Rotate the first n_dims of each head of x [T, H, D] by position step.pos0 + t, with cos/sin
// tables [positions, n_dims / 2] computed on the host (cs: cos, then sin from element sin_off). neox pairs i with i + n_dims/2, otherwise
// adjacent (2i, 2i + 1) dimensions are paired.
struct Params { n_tokens: u32, n_heads: u32, head_dim: u32, n_dims: u32, neox: u32, x_off: u32, y_off: u32, sin_off: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: array<u32>;
@group(0) @binding(2) var<storage, read> cs: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = gid.x + gid.y * nwg.x * 64u;
  let n = p.n_tokens * p.n_heads * p.head_dim;
  if (i >= n) { return; }
  let d = i % p.head_dim;
  let t = i / (p.n_heads * p.head_dim);
  let head = i - d;
  let half = p.n_dims / 2u;
  let pos = step[0] + t;
  var v = x[p.x_off + i];
  if (d < p.n_dims) {
    var k = d / 2u;
    if (p.neox == 1u) { k = d % half; }
    let c = cs[pos * half + k];
    let s = cs[p.sin_off + pos * half + k];
    if (p.neox == 1u) {
      if (d < half) { v = x[p.x_off + i] * c - x[p.x_off + head + d + half] * s; }
      else { v = x[p.x_off + i] * c + x[p.x_off + head + d - half] * s; }
    } else {
      if (d % 2u == 0u) { v = x[p.x_off + i] * c - x[p.x_off + i + 1u] * s; }
      else { v = x[p.x_off + i] * c + x[p.x_off + i - 1u] * s; }
    }
  }
  y[p.y_off + i] = v;
}
