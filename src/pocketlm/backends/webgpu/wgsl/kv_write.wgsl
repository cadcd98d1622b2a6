// Keys and values of T new tokens into the cache at positions step.pos0 + t: workgroup (h, t, 0)
// writes key head h of token t, (h, t, 1) value head h (z from `first`: 1 writes values only).
// Keys and values are read from `hsrc` ([T, n_kv_heads, dim] at k_off / v_off), keys normed
// (k_norm: see heads.wgsl) and rotated on the way, values normed without weight where v_norm.
struct Params {
  n_heads: u32, k_dim: u32, v_dim: u32, k_off: u32,
  v_off: u32, k_norm: u32, v_norm: u32, eps: f32,
  n_dims: u32, neox: u32, sin_off: u32, first: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: array<u32>;
@group(0) @binding(2) var<storage, read> hsrc: array<f32>;
@group(0) @binding(3) var<storage, read> cs: array<f32>;
@group(0) @binding(4) var<storage, read> nw: array<f32>;
@group(0) @binding(5) var<storage, read_write> keys: array<f32>;
@group(0) @binding(6) var<storage, read_write> values: array<f32>;

#include heads

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let h = wg.x;
  let t = wg.y;
  let pos = step[0] + t;
  if (wg.z + p.first == 0u) {
    head_load(p.k_off + (t * p.n_heads + h) * p.k_dim, p.k_dim, p.k_norm, p.eps, 0u, lid);
    for (var d = lid; d < p.k_dim; d += 64u) {
      keys[(pos * p.n_heads + h) * p.k_dim + d] = head_value(d, pos, p.n_dims, p.neox, p.sin_off);
    }
  } else {
    head_load(p.v_off + (t * p.n_heads + h) * p.v_dim, p.v_dim, p.v_norm, p.eps, 0u, lid);
    for (var d = lid; d < p.v_dim; d += 64u) { values[(pos * p.n_heads + h) * p.v_dim + d] = hv[d]; }
  }
}
