// Causal (optionally sliding-window, soft-capped, ALiBi-biased) attention of q [T, Hq, D] over the cache
// k/v [positions, Hkv, D]; query t sits at position step.pos0 + t and sees keys j with
// pos - window < j <= pos. One workgroup per (head, token, split): the query head is loaded once
// (normed and rotated on the way where q_norm / n_dims say: heads.wgsl), then the split's keys
// [split * chunk, (split + 1) * chunk) in tiles of 64 with an online softmax: a thread per key for
// the scores, then threads over (key lane, 4 output dimensions) for the values (head_dim a multiple
// of 4, at most 512: Gemma 4's full layers). The loops that read memory take four reads an iteration
// into independent sums, so that they are in flight together, and the tile's maximum and sum are
// reduced by halving: a single-query tile is latency, not bandwidth.
// One split: y is the output [T, Hq, D]. Several (decode: more workgroups than heads): y holds each
// split's unnormalised sums, maximum and denominator [T, Hq, n_splits, D + 2], which
// attention_merge combines.
// +fresh (one token): the step's own key and value are written to the cache here, not by kv_write:
// the workgroups whose split holds the token's position load them from hsrc (k_src, v_src: heads
// [n_kv_heads, head_dim]), norm (k_norm, v_norm; k's weight at nw[kw_off..]) and rotate the key
// as q is, store them at the position, and read them back with the rest (storageBarrier). The
// workgroups of the query heads that share a key head store the same values.
struct Params {
  n_tokens: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32,
  q_off: u32, y_off: u32, window: u32, has_softcap: u32,
  scale: f32, softcap: f32, has_alibi: u32, q_norm: u32,
  eps: f32, n_dims: u32, neox: u32, sin_off: u32,
  n_splits: u32, chunk: u32, k_src: u32, v_src: u32,
  k_norm: u32, v_norm: u32, kw_off: u32, pad0: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: array<u32>;
@group(0) @binding(2) var<storage, read> hsrc: array<f32>;  // q
#if fresh
@group(0) @binding(3) var<storage, read_write> k: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> v: array<vec4<f32>>;
#else
@group(0) @binding(3) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> v: array<vec4<f32>>;
#endif
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> slopes: array<f32>;  // ALiBi: score += slope[h] * key position
@group(0) @binding(7) var<storage, read> nw: array<f32>;
@group(0) @binding(8) var<storage, read> cs: array<f32>;

#include heads

var<workgroup> scores: array<f32, 64>;
var<workgroup> weights: array<f32, 64>;
var<workgroup> totals: array<f32, 64>;
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
  head_load(p.q_off + (t * p.n_heads + h) * p.head_dim, p.head_dim, p.q_norm, p.eps, 0u, lid);
  for (var i = lid; i < d4; i += 64u) {
    qs[i] = head_value4(4u * i, pos, p.n_dims, p.neox, p.sin_off);
  }
  workgroupBarrier();
#if fresh
  if (pos >= split * p.chunk && pos < split * p.chunk + p.chunk) {
    let at = pos * kv_stride + kvh * d4;
    head_load(p.k_src + kvh * p.head_dim, p.head_dim, p.k_norm, p.eps, p.kw_off, lid);
    for (var i = lid; i < d4; i += 64u) { k[at + i] = head_value4(4u * i, pos, p.n_dims, p.neox, p.sin_off); }
    workgroupBarrier();
    head_load(p.v_src + kvh * p.head_dim, p.head_dim, p.v_norm, p.eps, 0u, lid);
    for (var i = lid; i < d4; i += 64u) {
      v[at + i] = vec4<f32>(hv[4u * i], hv[4u * i + 1u], hv[4u * i + 2u], hv[4u * i + 3u]);
    }
  }
  storageBarrier();
#endif
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
      // four independent sums: the four loads of an iteration are in flight together
      var d = vec4<f32>(0.0);
      var i = 0u;
      for (; i + 4u <= d4; i += 4u) {
        d += vec4<f32>(dot(qs[i], k[kb + i]), dot(qs[i + 1u], k[kb + i + 1u]),
                       dot(qs[i + 2u], k[kb + i + 2u]), dot(qs[i + 3u], k[kb + i + 3u]));
      }
      for (; i < d4; i++) { d.x += dot(qs[i], k[kb + i]); }
      s = ((d.x + d.y) + (d.z + d.w)) * p.scale;
      if (p.has_softcap == 1u) { s = tanh(s / p.softcap) * p.softcap; }
      if (p.has_alibi == 1u) { s += slopes[h] * f32(j); }
    }
    // the tile's maximum and sum of exponentials by halving (6 steps, not 64 reads in a row)
    scores[lid] = s;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half = half >> 1u) {
      if (lid < half) { scores[lid] = max(scores[lid], scores[lid + half]); }
      workgroupBarrier();
    }
    let n = min(64u, hi + 1u - start);
    let new_m = max(m, scores[0]);
    let corr = exp(m - new_m);
    var w = 0.0;
    if (lid < n) { w = exp(s - new_m); }
    weights[lid] = w;
    totals[lid] = w;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half = half >> 1u) {
      if (lid < half) { totals[lid] += totals[lid + half]; }
      workgroupBarrier();
    }
    let tile_l = totals[0];
    l = l * corr + tile_l;
    acc[0] = acc[0] * corr;
    acc[1] = acc[1] * corr;
    if (d4 <= 64u) {
      if (kl < lanes) {  // four keys an iteration, their loads in flight together
        let vb = kvh * d4 + dim4;
        var i = kl;
        for (; i + 3u * lanes < n; i += 4u * lanes) {
          let a = v[(start + i) * kv_stride + vb];
          let b = v[(start + i + lanes) * kv_stride + vb];
          let c = v[(start + i + 2u * lanes) * kv_stride + vb];
          let e = v[(start + i + 3u * lanes) * kv_stride + vb];
          acc[0] += (weights[i] * a + weights[i + lanes] * b) + (weights[i + 2u * lanes] * c + weights[i + 3u * lanes] * e);
        }
        for (; i < n; i += lanes) {
          acc[0] += weights[i] * v[(start + i) * kv_stride + vb];
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
