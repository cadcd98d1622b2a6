// Causal (optionally sliding-window, soft-capped, ALiBi-biased) attention of q [T, Hq, D] over the cache
// k/v [positions, Hkv, D]; query t sits at position step.pos0 + t and sees keys j with
// pos - window < j <= pos. One workgroup per (head, token, split): the query head is loaded once
// (normed and rotated on the way where q_norm / n_dims say: heads.wgsl), then the split's keys
// [split * chunk, (split + 1) * chunk) in tiles of 64 with an online softmax: a thread per key for
// the scores, then threads over (key lane, 4 output dimensions) for the values (head_dim a multiple
// of 4, at most 512: Gemma 4's full layers).
// One split: y is the output [T, Hq, D]. Several (decode: more workgroups than heads): y holds each
// split's unnormalised sums, maximum and denominator [T, Hq, n_splits, D + 2], which
// attention_merge combines.
struct Params {
  n_tokens: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32,
  q_off: u32, y_off: u32, window: u32, has_softcap: u32,
  scale: f32, softcap: f32, has_alibi: u32, q_norm: u32,
  eps: f32, n_dims: u32, neox: u32, sin_off: u32,
  n_splits: u32, chunk: u32, pad0: u32, pad1: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: array<u32>;
@group(0) @binding(2) var<storage, read> hsrc: array<f32>;  // q
@group(0) @binding(3) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> slopes: array<f32>;  // ALiBi: score += slope[h] * key position
@group(0) @binding(7) var<storage, read> nw: array<f32>;
@group(0) @binding(8) var<storage, read> cs: array<f32>;

#include heads

var<workgroup> scores: array<f32, 64>;
var<workgroup> weights: array<f32, 64>;
var<workgroup> qs: array<vec4<f32>, 128>;
var<workgroup> sums: array<vec4<f32>, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let h = wg.x;
  let t = wg.y;
  let split = wg.z;
  let pos = step[0] + t;
  let kvh = h / (p.n_heads / p.n_kv_heads);
  let d4 = p.head_dim / 4u;  // head_dim is a multiple of 4
  let kv_stride = p.n_kv_heads * d4;
  head_load(p.q_off + (t * p.n_heads + h) * p.head_dim, p.head_dim, p.q_norm, p.eps, lid);
  for (var i = lid; i < d4; i += 64u) {
    let d = 4u * i;
    qs[i] = vec4<f32>(head_value(d, pos, p.n_dims, p.neox, p.sin_off), head_value(d + 1u, pos, p.n_dims, p.neox, p.sin_off),
                      head_value(d + 2u, pos, p.n_dims, p.neox, p.sin_off), head_value(d + 3u, pos, p.n_dims, p.neox, p.sin_off));
  }
  workgroupBarrier();
  var lo = split * p.chunk;
  if (p.window > 0u && pos + 1u > p.window) { lo = max(lo, pos + 1u - p.window); }
  let hi = min(pos, split * p.chunk + p.chunk - 1u);  // the last key of the split
  let out = p.y_off + ((t * p.n_heads + h) * p.n_splits + split) * (p.head_dim + 2u);
  // weighted values: thread = (key lane, group of 4 dimensions); several key lanes when d4 < 64
  let lanes = max(1u, 64u / d4);
  let kl = lid / d4;
  let dim4 = lid % d4;
  var m = -3.0e38;
  var l = 0.0;
  var acc = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
  for (var start = lo; start <= hi && lo <= hi; start += 64u) {
    let j = start + lid;
    var s = -3.0e38;
    if (j <= hi) {
      let kb = j * kv_stride + kvh * d4;
      var dot_qk = 0.0;
      for (var i = 0u; i < d4; i++) { dot_qk += dot(qs[i], k[kb + i]); }
      s = dot_qk * p.scale;
      if (p.has_softcap == 1u) { s = tanh(s / p.softcap) * p.softcap; }
      if (p.has_alibi == 1u) { s += slopes[h] * f32(j); }
    }
    scores[lid] = s;
    workgroupBarrier();
    let n = min(64u, hi + 1u - start);
    var tile_max = -3.0e38;
    for (var i = 0u; i < n; i++) { tile_max = max(tile_max, scores[i]); }
    let new_m = max(m, tile_max);
    let corr = exp(m - new_m);
    var w = 0.0;
    if (lid < n) { w = exp(s - new_m); }
    weights[lid] = w;
    workgroupBarrier();
    var tile_l = 0.0;
    for (var i = 0u; i < n; i++) { tile_l += weights[i]; }
    l = l * corr + tile_l;
    acc[0] = acc[0] * corr;
    acc[1] = acc[1] * corr;
    if (d4 <= 64u) {
      if (kl < lanes) {
        for (var i = kl; i < n; i += lanes) {
          acc[0] += weights[i] * v[(start + i) * kv_stride + kvh * d4 + dim4];
        }
      }
    } else {
      for (var i = 0u; i < n; i++) {
        let vb = (start + i) * kv_stride + kvh * d4;
        acc[0] += weights[i] * v[vb + lid];
        if (lid + 64u < d4) { acc[1] += weights[i] * v[vb + lid + 64u]; }
      }
    }
    m = new_m;
    workgroupBarrier();
  }
  var total = array<vec4<f32>, 2>(acc[0], acc[1]);
  if (d4 <= 64u) {  // sum the key lanes
    sums[lid] = acc[0];
    workgroupBarrier();
    if (kl == 0u) {
      for (var i = 1u; i < lanes; i++) { total[0] += sums[i * d4 + dim4]; }
    }
  }
  var norm = 1.0;
  var base = out;
  if (p.n_splits == 1u) {
    norm = 1.0 / l;
    base = p.y_off + (t * p.n_heads + h) * p.head_dim;
  } else if (lid == 0u) {
    y[out + p.head_dim] = m;
    y[out + p.head_dim + 1u] = l;
  }
  for (var c = 0u; c < 2u; c++) {
    var i = lid + 64u * c;
    var value = total[c];
    if (d4 <= 64u) {
      i = dim4;
      if (kl != 0u || c > 0u) { continue; }
    }
    if (i < d4) {
      let at = base + 4u * i;
      y[at] = value.x * norm;
      y[at + 1u] = value.y * norm;
      y[at + 2u] = value.z * norm;
      y[at + 3u] = value.w * norm;
    }
  }
}
