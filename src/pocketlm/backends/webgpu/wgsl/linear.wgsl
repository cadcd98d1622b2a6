// y = W x' for W [rows, cols], in variants by how W is held: +int8: int8 packed four to a u32
// (little-endian) with a float scale (and offset) per sub-block of `sub` columns (y = sum_g scale[r, g]
// * (q[r, g] . x'[g]) + offset[r, g] * sum(x'[g])); +int4: the same as 4-bit values (kernels.int4's
// layout, runs of 64 values in 32 bytes, byte j holding value j in its low nibble and 32 + j in its
// high one; sub = 32); +int4+int5: 5-bit values, each row's nibbles as +int4 then one word of their
// fifth bits per 16 bytes of them (backend._five_bits); +f32: float32. Scales and offsets are float32,
// or float16 pairs where half_scales. Each variant carries only its own code (smaller to compile, and
// on a CPU device such as SwiftShader, cheaper a workgroup).
// x' in variants too: +plain: x as read; +norm: RMS-normed per token (times norm weight nw where
// has_norm_w); +gated: act(x[x_off + ...]) * x[x2_off + ...] (x_mode 2 silu, 3 gelu_tanh, 4 gelu);
// +merged (one token): split attention's partial sums merged (x holds [heads, m_splits, m_dim + 2],
// see attention); +resnorm (one token): a residual sum with a normed branch, then normed
// (Gemma's post-norms): h = bias[r_off + c] + x[x_off + c] / rms(x) (* nw[post_off + c] where
// has_post_w, eps_post), x' = h / rms(h) (* nw[c] where has_norm_w); the first workgroup also
// writes h to res[h_off ..] for the layer's later residual (bias and res read no epilogue here).
// Several matrices stacked by rows (q/k/v, gate/up) run as one: output row R = row_base + r of
// segment s (R in [seg_s, seg_s+1), seg_0 = 0) goes to y[y_off_s + t * (seg_s+1 - seg_s) + R - seg_s].
// Epilogue: + bias[R] where has_bias, + res[res_off + same index] where has_res (one segment).
// Default: four output rows per workgroup, 16 threads splitting each row, up to 8 tokens sharing each
// weight load, x' read from the buffer. +one (one token of at most XS_MAX values, int8 or int4): x'
// computed once into workgroup memory, `lanes` threads a row (64 / lanes rows a workgroup: 4 for
// large matrices, so that more rows share the staging), four 16-byte weight loads in flight a thread.
struct Params {
  rows: u32, cols: u32, sub: u32, n_tokens: u32,
  x_off: u32, x_stride: u32, w_row0: u32, has_offset: u32,
  row_base: u32, x_mode: u32, x2_off: u32, eps: f32,
  seg1: u32, seg2: u32, seg3: u32, y_off0: u32,
  y_off1: u32, y_off2: u32, has_bias: u32, has_res: u32,
  res_off: u32, has_norm_w: u32, lanes: u32, half_scales: u32,
  m_splits: u32, m_dim: u32, pad0: u32, pad1: u32,
  r_off: u32, h_off: u32, post_off: u32, has_post_w: u32,
  eps_post: f32, pad3: u32, pad4: u32, pad5: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<u32>>;  // int8 x 16, or float32 x 4
@group(0) @binding(2) var<storage, read> scale: array<u32>;  // float32, or float16 pairs (half_scales)
@group(0) @binding(3) var<storage, read> offs: array<u32>;
@group(0) @binding(4) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> nw: array<f32>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
#if resnorm
@group(0) @binding(8) var<storage, read_write> res: array<f32>;
#else
@group(0) @binding(8) var<storage, read> res: array<f32>;
#endif

var<workgroup> part: array<f32, 512>;  // [token, row * 16 + lane]
var<workgroup> inv: array<f32, 8>;  // 1 / rms of each token of the tile (+norm)
// x' of one token: at most XS_MAX values (+wide), else XS_SMALL (a smaller array, so that more
// workgroups fit on a compute unit: the output matrix's thousands of them)
const XS_MAX: u32 = 3072u;
const XS_SMALL: u32 = 1024u;
#if wide
var<workgroup> xs: array<vec4<f32>, 768>;
#else
var<workgroup> xs: array<vec4<f32>, 256>;
#endif
const MW_MAX: u32 = 256u;
var<workgroup> mw: array<f32, 256>;  // +merged: each (head, split)'s weight (heads * splits <= MW_MAX)

fn word(i: u32) -> u32 { return q[i / 4u][i % 4u]; }

fn nibbles(w: u32) -> vec4<f32> {  // the low nibbles of w's four bytes
  return vec4<f32>(f32(w & 15u), f32((w >> 8u) & 15u), f32((w >> 16u) & 15u), f32((w >> 24u) & 15u));
}

#include scales

// 16-byte loads a row of a nibble matrix with `loads` loads of nibbles (+int5: and their fifth bits)
fn row_loads(loads: u32) -> u32 {
#if int5
  return loads + loads / 4u;
#else
  return loads;
#endif
}

// the fifth bits of the 32 values of nibble load j of the row starting at load `row` (+int5; else 0)
fn high_word(row: u32, loads: u32, j: u32) -> u32 {
#if int5
  return q[row + loads + j / 4u][j % 4u];
#else
  return 0u;
#endif
}

// the values in the low (high) nibbles of word i of a load, plus 16 times their fifth bits from hw:
// bits 4i .. 4i + 3 of hw spread to bit 4 of each byte (times 0x00204081 puts bit k at 8k, among others)
fn lows(w: u32, hw: u32, i: u32) -> vec4<f32> {
#if int5
  let v = (w & 0x0F0F0F0Fu) | (((((hw >> (4u * i)) & 15u) * 0x00204081u) & 0x01010101u) << 4u);
  return vec4<f32>(f32(v & 31u), f32((v >> 8u) & 31u), f32((v >> 16u) & 31u), f32(v >> 24u));
#else
  return nibbles(w);
#endif
}

fn highs(w: u32, hw: u32, i: u32) -> vec4<f32> {
  return lows(w >> 4u, hw >> 16u, i);
}

fn int8x4(w: u32) -> vec4<f32> {
  return vec4<f32>(f32(bitcast<i32>(w << 24u) >> 24u), f32(bitcast<i32>(w << 16u) >> 24u),
                   f32(bitcast<i32>(w << 8u) >> 24u), f32(bitcast<i32>(w) >> 24u));
}

#if gated
// act(v) by x_mode: 2 silu, 3 gelu_tanh, 4 gelu (erf)
fn gelu_erf(v: f32) -> f32 {
  let z = abs(v) * 0.7071067811865476;
  let t = 1.0 / (1.0 + 0.3275911 * z);
  let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
  return 0.5 * v * (1.0 + sign(v) * (1.0 - poly * exp(-z * z)));
}
#endif

#if merged
// values c .. c + 3 of the attention output from split partials (one token; c a multiple of 4, as
// m_dim is): head c / m_dim, each split's sums times its weight exp(m_s - m) / l from `mw` (filled
// by merge_weights); the four values of a split are read together
fn merged4(c: u32) -> vec4<f32> {
  let size = p.m_dim + 2u;
  let h = c / p.m_dim;
  let base = p.x_off + h * p.m_splits * size + c % p.m_dim;
  var sum = vec4<f32>(0.0);
  for (var s = 0u; s < p.m_splits; s++) {
    let w = mw[h * p.m_splits + s];
    let i = base + s * size;
    if (w > 0.0) { sum += vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]) * w; }
  }
  return sum;
}

// mw[h * m_splits + s]: split s's share of head h. Every (head, split)'s maximum and sum are read
// at once, a thread each (into `part`, free until the product), then one thread a head weighs them.
fn merge_weights(lid: u32) {
  let size = p.m_dim + 2u;
  let heads = p.cols / p.m_dim;
  for (var i = lid; i < heads * p.m_splits; i += 64u) {
    let at = p.x_off + i * size + p.m_dim;
    part[i] = x[at];
    part[256u + i] = x[at + 1u];
  }
  workgroupBarrier();
  for (var h = lid; h < heads; h += 64u) {
    let first = h * p.m_splits;
    var m = -3.0e38;
    for (var s = 0u; s < p.m_splits; s++) {
      if (part[256u + first + s] > 0.0) { m = max(m, part[first + s]); }
    }
    var l = 0.0;
    for (var s = 0u; s < p.m_splits; s++) {
      let ls = part[256u + first + s];
      var e = 0.0;
      if (ls > 0.0) { e = exp(part[first + s] - m); }
      mw[first + s] = e;
      l += ls * e;
    }
    for (var s = 0u; s < p.m_splits; s++) { mw[first + s] = mw[first + s] / l; }
  }
}
#endif

// x'[t, c] (c < cols)
fn x_at(t: u32, tile: u32, c: u32) -> f32 {
  if (c >= p.cols) { return 0.0; }
  let v = x[p.x_off + t * p.x_stride + c];
#if norm
  var n = v * inv[tile];
  if (p.has_norm_w == 1u) { n = n * nw[c]; }
  return n;
#elif gated
  let u = x[p.x2_off + t * p.x_stride + c];
  if (p.x_mode == 2u) { return v / (1.0 + exp(-v)) * u; }
  if (p.x_mode == 3u) {
    let inner = clamp(0.7978845608 * (v + 0.044715 * v * v * v), -15.0, 15.0);
    return 0.5 * v * (1.0 + tanh(inner)) * u;
  }
  return gelu_erf(v) * u;
#elif merged
  return merged4(c - c % 4u)[c % 4u];
#elif resnorm
  var n = h_at(c) * inv[0];
  if (p.has_norm_w == 1u) { n = n * nw[c]; }
  return n;
#else
  return v;
#endif
}

// x'[t, c .. c + 4]
fn x4(t: u32, tile: u32, c: u32) -> vec4<f32> {
#if merged
  if (c % 4u == 0u && c + 3u < p.cols) { return merged4(c); }
#endif
#if plain
  if (c + 3u < p.cols) {
    let i = p.x_off + t * p.x_stride + c;
    return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);
  }
#endif
  return vec4<f32>(x_at(t, tile, c), x_at(t, tile, c + 1u), x_at(t, tile, c + 2u), x_at(t, tile, c + 3u));
}

// this thread's share of the sum of squares of x[base .. base + cols): four loads in flight (norms)
fn squares(base: u32, lid: u32) -> f32 {
  var s = vec4<f32>(0.0);
  var c = lid;
  for (; c + 192u < p.cols; c += 256u) {
    let v = vec4<f32>(x[base + c], x[base + c + 64u], x[base + c + 128u], x[base + c + 192u]);
    s += v * v;
  }
  for (; c < p.cols; c += 64u) { let v = x[base + c]; s.x += v * v; }
  return (s.x + s.y) + (s.z + s.w);
}

#if norm
// inv[t] = 1 / rms of tokens first .. first + nt, over the whole workgroup
fn token_norms(first: u32, nt: u32, lid: u32) {
  for (var t = 0u; t < nt; t++) {
    part[t * 64u + lid] = squares(p.x_off + (first + t) * p.x_stride, lid);
  }
  workgroupBarrier();
  for (var stride = 32u; stride > 0u; stride = stride >> 1u) {
    if (lid < stride) {
      for (var t = 0u; t < nt; t++) { part[t * 64u + lid] += part[t * 64u + lid + stride]; }
    }
    workgroupBarrier();
  }
  if (lid < nt) { inv[lid] = 1.0 / sqrt(part[lid * 64u] / f32(p.cols) + p.eps); }
  workgroupBarrier();
}
#endif

#if resnorm
// the residual stream h at column c (inv[1]: 1 / rms of the branch)
fn h_at(c: u32) -> f32 {
  var b = x[p.x_off + c] * inv[1];
  if (p.has_post_w == 1u) { b = b * nw[p.post_off + c]; }
  return bias[p.r_off + c] + b;
}

#include row_sum

// inv[1] = 1 / rms of the branch, inv[0] = 1 / rms of h; the first workgroup writes h
fn residual_norms(first: bool, lid: u32) {
  let branch = row_sum(lid, squares(p.x_off, lid));
  if (lid == 0u) { inv[1] = 1.0 / sqrt(branch / f32(p.cols) + p.eps_post); }
  workgroupBarrier();
  var sum = vec4<f32>(0.0);
  var c = lid;
  for (; c + 192u < p.cols; c += 256u) {  // four columns' reads in flight
    let h = vec4<f32>(h_at(c), h_at(c + 64u), h_at(c + 128u), h_at(c + 192u));
    sum += h * h;
    if (first) {
      res[p.h_off + c] = h.x;
      res[p.h_off + c + 64u] = h.y;
      res[p.h_off + c + 128u] = h.z;
      res[p.h_off + c + 192u] = h.w;
    }
  }
  for (; c < p.cols; c += 64u) {
    let h = h_at(c);
    sum.x += h * h;
    if (first) { res[p.h_off + c] = h; }
  }
  let total = row_sum(lid, (sum.x + sum.y) + (sum.z + sum.w));
  if (lid == 0u) { inv[0] = 1.0 / sqrt(total / f32(p.cols) + p.eps); }
  workgroupBarrier();
}
#endif

#include store

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
#if merged
  merge_weights(lid);
  workgroupBarrier();
#endif
#if one
  let r1 = (wg.x + wg.y * nwg.x) * (64u / p.lanes) + lid / p.lanes;
  one_token(r1, p.w_row0 + r1, lid % p.lanes, lid, wg.x + wg.y == 0u);
#else
  let lane = lid % 16u;
  let r = (wg.x + wg.y * nwg.x) * 4u + lid / 16u;
  let n_sub = p.cols / max(p.sub, 1u);
  let wr = p.w_row0 + r;
  for (var t0 = 0u; t0 < p.n_tokens; t0 += 8u) {
    let nt = min(8u, p.n_tokens - t0);
#if norm
    token_norms(t0, nt, lid);
#endif
    var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    if (r < p.rows) {
#if int8
      let per_row = p.cols / 16u;  // 16 weights a load (sub is 16 or 32)
      for (var j = lane; j < per_row; j += 16u) {
        let w = q[wr * per_row + j];
        let g = wr * n_sub + (j * 16u) / p.sub;
        var o = 0.0;
        if (p.has_offset == 1u) { o = offset_at(g); }
        let w0 = int8x4(w.x);
        let w1 = int8x4(w.y);
        let w2 = int8x4(w.z);
        let w3 = int8x4(w.w);
        let c = j * 16u;
        for (var t = 0u; t < nt; t++) {
          let xa = x4(t0 + t, t, c);
          let xb = x4(t0 + t, t, c + 4u);
          let xc = x4(t0 + t, t, c + 8u);
          let xd = x4(t0 + t, t, c + 12u);
          let sum = dot(w0, xa) + dot(w1, xb) + dot(w2, xc) + dot(w3, xd);
          acc[t] += scale_at(g) * sum + o * dot(xa + xb + xc + xd, vec4<f32>(1.0));
        }
      }
#elif int4
      let per_row = p.cols / 32u;  // 32 weights of 4 bits a load
      let row = wr * row_loads(per_row);
      for (var j = lane; j < per_row; j += 16u) {
        let w = q[row + j];
        let hw = high_word(row, per_row, j);
        let run = j / 2u;
        let g = wr * n_sub + 2u * run;
        let c = 64u * run + 16u * (j % 2u);  // the column of the first low nibble; the high ones 32 on
        for (var t = 0u; t < nt; t++) {
          var lo = 0.0;
          var hi = 0.0;
          var x_lo = vec4<f32>(0.0);
          var x_hi = vec4<f32>(0.0);
          for (var i = 0u; i < 4u; i++) {
            let a = x4(t0 + t, t, c + 4u * i);
            let b = x4(t0 + t, t, c + 32u + 4u * i);
            lo += dot(lows(w[i], hw, i), a);
            hi += dot(highs(w[i], hw, i), b);
            x_lo += a;
            x_hi += b;
          }
          let ones = vec4<f32>(1.0);
          let s = scale_pair(g);
          let o = offset_pair(g);
          acc[t] += s.x * lo + o.x * dot(x_lo, ones) + s.y * hi + o.y * dot(x_hi, ones);
        }
      }
#else
      let words = (p.cols + 3u) / 4u;  // float32
      for (var j = lane; j < words; j += 16u) {
        let c = j * 4u;
        let b = wr * p.cols + c;
        var wv = vec4<f32>(bitcast<f32>(word(b)), 0.0, 0.0, 0.0);
        if (c + 1u < p.cols) { wv.y = bitcast<f32>(word(b + 1u)); }
        if (c + 2u < p.cols) { wv.z = bitcast<f32>(word(b + 2u)); }
        if (c + 3u < p.cols) { wv.w = bitcast<f32>(word(b + 3u)); }
        for (var t = 0u; t < nt; t++) { acc[t] += dot(wv, x4(t0 + t, t, c)); }
      }
#endif
    }
    for (var t = 0u; t < nt; t++) { part[t * 64u + lid] = acc[t]; }
    workgroupBarrier();
    for (var stride = 8u; stride > 0u; stride = stride >> 1u) {
      if (lane < stride) {
        for (var t = 0u; t < nt; t++) { part[t * 64u + lid] += part[t * 64u + lid + stride]; }
      }
      workgroupBarrier();
    }
    if (r < p.rows && lane < nt) { store(r, t0 + lane, part[lane * 64u + lid - lane]); }
    workgroupBarrier();
  }
#endif
}

#if one
// W's values from 16-byte load j of a row whose sub-blocks start at g0, times the staged x'
fn piece(w: vec4<u32>, hw: u32, g0: u32, j: u32) -> f32 {
#if int4
  // 32 values of 4 bits: half of a run of 64
  let run = j / 2u;
  let b = 16u * run + 4u * (j % 2u);  // xs index of the values in the low nibbles; the high ones 8 on
  let g = g0 + 2u * run;
  let lo = dot(lows(w.x, hw, 0u), xs[b]) + dot(lows(w.y, hw, 1u), xs[b + 1u]) + dot(lows(w.z, hw, 2u), xs[b + 2u])
         + dot(lows(w.w, hw, 3u), xs[b + 3u]);
  let hi = dot(highs(w.x, hw, 0u), xs[b + 8u]) + dot(highs(w.y, hw, 1u), xs[b + 9u])
         + dot(highs(w.z, hw, 2u), xs[b + 10u]) + dot(highs(w.w, hw, 3u), xs[b + 11u]);
  let ones = vec4<f32>(1.0);
  let x_lo = dot(xs[b] + xs[b + 1u] + xs[b + 2u] + xs[b + 3u], ones);
  let x_hi = dot(xs[b + 8u] + xs[b + 9u] + xs[b + 10u] + xs[b + 11u], ones);
  let s = scale_pair(g);
  let o = offset_pair(g);
  return s.x * lo + o.x * x_lo + s.y * hi + o.y * x_hi;
#else
  // 16 int8 values (columns 16 j ..)
  let g = g0 + (j * 16u) / p.sub;
  let a = xs[4u * j];
  let b = xs[4u * j + 1u];
  let c = xs[4u * j + 2u];
  let d = xs[4u * j + 3u];
  var sum = scale_at(g) * (dot(int8x4(w.x), a) + dot(int8x4(w.y), b) + dot(int8x4(w.z), c) + dot(int8x4(w.w), d));
  if (p.has_offset == 1u) { sum += offset_at(g) * dot(a + b + c + d, vec4<f32>(1.0)); }
  return sum;
#endif
}

// One token: x' into workgroup memory once, then four 16-byte weight loads in flight a thread.
fn one_token(r: u32, wr: u32, lane: u32, lid: u32, first: bool) {
#if norm
  token_norms(0u, 1u, lid);
#elif resnorm
  residual_norms(first, lid);
#endif
  for (var c4 = lid; c4 < p.cols / 4u; c4 += 64u) { xs[c4] = x4(0u, 0u, c4 * 4u); }
  workgroupBarrier();
  var acc = 0.0;
  if (r < p.rows) {
#if int4
    let per_row = p.cols / 32u;
#else
    let per_row = p.cols / 16u;
#endif
    let n_sub = p.cols / p.sub;
    let row = wr * row_loads(per_row);
    let g0 = wr * n_sub;
    // four loads in flight a thread before any is used, then the rest one at a time
    var j = lane;
    for (; j + 3u * p.lanes < per_row; j += 4u * p.lanes) {
      let j1 = j + p.lanes;
      let j2 = j + 2u * p.lanes;
      let j3 = j + 3u * p.lanes;
      let w0 = q[row + j];
      let w1 = q[row + j1];
      let w2 = q[row + j2];
      let w3 = q[row + j3];
      let h0 = high_word(row, per_row, j);
      let h1 = high_word(row, per_row, j1);
      let h2 = high_word(row, per_row, j2);
      let h3 = high_word(row, per_row, j3);
      acc += piece(w0, h0, g0, j) + piece(w1, h1, g0, j1);
      acc += piece(w2, h2, g0, j2) + piece(w3, h3, g0, j3);
    }
    for (; j < per_row; j += p.lanes) { acc += piece(q[row + j], high_word(row, per_row, j), g0, j); }
  }
  part[lid] = acc;
  workgroupBarrier();
  for (var stride = p.lanes / 2u; stride > 0u; stride = stride >> 1u) {
    if (lane < stride) { part[lid] += part[lid + stride]; }
    workgroupBarrier();
  }
  if (r < p.rows && lane == 0u) { store(r, 0u, part[lid]); }
}
#endif
