// Causal (optionally sliding-window, soft-capped, ALiBi-biased) attention of q [T, Hq, D] over the cache
// k/v [positions, Hkv, D]; query t sits at position step.pos0 + t and sees keys j with
// pos - window < j <= pos. One workgroup per (head, token): tiles of 64 keys, online softmax,
// each thread accumulating up to 8 output dimensions (head_dim <= 512: Gemma 4's full layers).
struct Params {
  n_tokens: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32,
  q_off: u32, y_off: u32, window: u32, has_softcap: u32,
  scale: f32, softcap: f32, has_alibi: u32, pad1: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: array<u32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> k: array<f32>;
@group(0) @binding(4) var<storage, read> v: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> slopes: array<f32>;  // ALiBi: score += slope[h] * key position

var<workgroup> scores: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let h = wg.x;
  let t = wg.y;
  let pos = step[0] + t;
  let kvh = h / (p.n_heads / p.n_kv_heads);
  let kv_stride = p.n_kv_heads * p.head_dim;
  let qb = p.q_off + (t * p.n_heads + h) * p.head_dim;
  var lo = 0u;
  if (p.window > 0u && pos + 1u > p.window) { lo = pos + 1u - p.window; }
  var m = -3.0e38;
  var l = 0.0;
  var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
  for (var start = lo; start <= pos; start += 64u) {
    let j = start + lid;
    var s = -3.0e38;
    if (j <= pos) {
      let kb = j * kv_stride + kvh * p.head_dim;
      var dot_qk = 0.0;
      for (var d = 0u; d < p.head_dim; d++) { dot_qk += q[qb + d] * k[kb + d]; }
      s = dot_qk * p.scale;
      if (p.has_softcap == 1u) { s = tanh(s / p.softcap) * p.softcap; }
      if (p.has_alibi == 1u) { s += slopes[h] * f32(j); }
    }
    scores[lid] = s;
    workgroupBarrier();
    var tile_max = -3.0e38;
    let n = min(64u, pos + 1u - start);
    for (var i = 0u; i < n; i++) { tile_max = max(tile_max, scores[i]); }
    let new_m = max(m, tile_max);
    let corr = exp(m - new_m);
    l = l * corr;
    for (var c = 0u; c < 8u; c++) { acc[c] = acc[c] * corr; }
    for (var i = 0u; i < n; i++) {
      let w = exp(scores[i] - new_m);
      l += w;
      let vb = (start + i) * kv_stride + kvh * p.head_dim;
      for (var c = 0u; c < 8u; c++) {
        let d = lid + 64u * c;
        if (d < p.head_dim) { acc[c] += w * v[vb + d]; }
      }
    }
    m = new_m;
    workgroupBarrier();
  }
  for (var c = 0u; c < 8u; c++) {
    let d = lid + 64u * c;
    if (d < p.head_dim) { y[p.y_off + (t * p.n_heads + h) * p.head_dim + d] = acc[c] / l; }
  }
}
