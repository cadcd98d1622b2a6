// out[t, :] = row step.ids[t] * id_mul + id_add of an int8 table (packed four to a u32; weight_kind 2:
// nibbles in kernels.int4's layout, runs of 64 values in 32 bytes; 3: 5-bit values, the nibbles then
// their fifth bits, backend._five_bits) with per-sub-block scale (and offset; float16 pairs where
// half_scales); rows outside [row_base, row_base + rows) belong to another chunk;
// ids at or beyond id_limit read as id 0.
struct Params {
  n_tokens: u32, cols: u32, sub: u32, has_offset: u32,
  row_base: u32, rows: u32, y_off: u32, id_mul: u32,
  id_add: u32, weight_kind: u32, id_limit: u32, half_scales: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: array<u32>;
@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read> scale: array<u32>;
@group(0) @binding(4) var<storage, read> offs: array<u32>;

#include scales
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = gid.x + gid.y * nwg.x * 64u;
  if (i >= p.n_tokens * p.cols) { return; }
  let t = i / p.cols;
  let c = i % p.cols;
  let token = select(0u, step[2u + t], step[2u + t] < p.id_limit);
  let id = token * p.id_mul + p.id_add;
  if (id < p.row_base || id >= p.row_base + p.rows) { return; }
  let r = id - p.row_base;
  var value = 0.0;
  if (p.weight_kind >= 2u) {  // byte j of a run: value j (low nibble) and value 32 + j (high)
    var row_words = p.cols / 8u;
    if (p.weight_kind == 3u) { row_words += p.cols / 32u; }
    let at = (c / 64u) * 32u + c % 32u;  // the byte in the row
    let byte = r * row_words * 4u + at;
    let shift = 4u * ((c % 64u) / 32u);
    var v = (q[byte / 4u] >> (8u * (byte % 4u) + shift)) & 15u;
    if (p.weight_kind == 3u) {  // bit k of word at / 16: byte k's low nibble's fifth bit, 16 + k its high one's
      v |= ((q[r * row_words + p.cols / 8u + at / 16u] >> (at % 16u + 4u * shift)) & 1u) << 4u;
    }
    value = f32(v);
  } else {
    let w = q[(r * p.cols + c) / 4u];
    value = f32(bitcast<i32>(w << (24u - 8u * (c % 4u))) >> 24u);
  }
  let g = r * (p.cols / p.sub) + c / p.sub;
  var o = 0.0;
  if (p.has_offset == 1u) { o = offset_at(g); }
  y[p.y_off + i] = scale_at(g) * value + o;
}
