// y = W x for many tokens (prefill): the same product, variants (+int8, +int4, +f32) and epilogue as
// `linear` (x read as is; +int4+int5 too), computed in tiles: a workgroup of 256 threads takes 64 rows x 32 tokens, steps over the
// columns 32 at a time with the weights (dequantized) and x staged in workgroup memory, and each
// thread accumulates 4 rows x 2 tokens.
struct Params {
  rows: u32, cols: u32, sub: u32, n_tokens: u32,
  x_off: u32, x_stride: u32, w_row0: u32, has_offset: u32,
  row_base: u32, seg1: u32, seg2: u32, seg3: u32,
  y_off0: u32, y_off1: u32, y_off2: u32, has_bias: u32,
  has_res: u32, res_off: u32, half_scales: u32, pad1: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<u32>>;  // int8 x 16, or float32 x 4
@group(0) @binding(2) var<storage, read> scale: array<u32>;  // float32, or float16 pairs (half_scales)
@group(0) @binding(3) var<storage, read> offs: array<u32>;
@group(0) @binding(4) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read> res: array<f32>;

var<workgroup> ws: array<f32, 2048>;  // [k, row]: 32 columns of 64 rows
var<workgroup> xs: array<f32, 1024>;  // [k, token]: 32 columns of 32 tokens

#include scales

fn int8_of(w: u32, k: u32) -> f32 {
  return f32(bitcast<i32>(w << (24u - 8u * k)) >> 24u);
}

#include store

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let row0 = wg.x * 64u;
  let tok0 = wg.y * 32u;
  let tr = (lid % 16u) * 4u;  // this thread's 4 rows of the tile
  let tt = (lid / 16u) * 2u;  // and 2 tokens
  var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
  let per_row = p.cols / 16u;  // vec4<u32> of int8 a row
  for (var k0 = 0u; k0 < p.cols; k0 += 32u) {
#if int8
    // 64 rows x 32 int8 = 128 loads of 16
    if (lid < 128u) {
      let r = lid / 2u;
      let half = lid % 2u;
      let c = k0 + half * 16u;
      var vals = array<f32, 16>();
      if (row0 + r < p.rows) {
        let wr = p.w_row0 + row0 + r;
        let w = q[wr * per_row + c / 16u];
        let g = wr * (p.cols / p.sub) + c / p.sub;
        let s = scale_at(g);
        var o = 0.0;
        if (p.has_offset == 1u) { o = offset_at(g); }
        for (var i = 0u; i < 4u; i++) {
          let word = w[i];
          for (var b = 0u; b < 4u; b++) { vals[i * 4u + b] = s * int8_of(word, b) + o; }
        }
      }
      for (var i = 0u; i < 16u; i++) { ws[(half * 16u + i) * 64u + r] = vals[i]; }
    }
#elif int4
    // 64 rows x 32 values of 4 bits: the 32 bytes of their run
    if (lid < 128u) {
      let r = lid / 2u;
      let half = lid % 2u;  // bytes 16 half .. of the run
      var vals = array<f32, 16>();
      if (row0 + r < p.rows) {
        let wr = p.w_row0 + row0 + r;
        let loads = p.cols / 32u;
        let j = (k0 / 64u) * 2u + half;
#if int5
        let row = wr * (loads + loads / 4u);
        let hw = q[row + loads + j / 4u][j % 4u];  // the fifth bits (backend._five_bits)
#else
        let row = wr * loads;
#endif
        let w = q[row + j];
        let g = wr * (p.cols / 32u) + k0 / 32u;
        let s = scale_at(g);
        let o = offset_at(g);
        let shift = 4u * ((k0 % 64u) / 32u);  // columns 32.. of the run are the high nibbles
        for (var i = 0u; i < 4u; i++) {
          var v = (w[i] >> shift) & 0x0F0F0F0Fu;  // a value a byte
#if int5
          // bits 4i .. 4i + 3 of hw (16 on for the high nibbles) to bit 4 of each byte
          v |= ((((hw >> (4u * i + 4u * shift)) & 15u) * 0x00204081u) & 0x01010101u) << 4u;
#endif
          for (var b = 0u; b < 4u; b++) { vals[i * 4u + b] = s * f32((v >> (8u * b)) & 31u) + o; }
        }
      }
      for (var i = 0u; i < 16u; i++) { ws[(half * 16u + i) * 64u + r] = vals[i]; }
    }
#else
    // float32: 2048 values, 8 a thread
    for (var e = lid; e < 2048u; e += 256u) {
      let r = e / 32u;
      let c = k0 + e % 32u;
      var v = 0.0;
      if (row0 + r < p.rows && c < p.cols) {
        let i = (p.w_row0 + row0 + r) * p.cols + c;
        v = bitcast<f32>(q[i / 4u][i % 4u]);
      }
      ws[(e % 32u) * 64u + r] = v;
    }
#endif
    for (var e = lid; e < 1024u; e += 256u) {
      let t = e / 32u;
      let c = k0 + e % 32u;
      var v = 0.0;
      if (tok0 + t < p.n_tokens && c < p.cols) { v = x[p.x_off + (tok0 + t) * p.x_stride + c]; }
      xs[(e % 32u) * 32u + t] = v;
    }
    workgroupBarrier();
    for (var k = 0u; k < 32u; k++) {
      let a = vec4<f32>(ws[k * 64u + tr], ws[k * 64u + tr + 1u], ws[k * 64u + tr + 2u], ws[k * 64u + tr + 3u]);
      let b0 = xs[k * 32u + tt];
      let b1 = xs[k * 32u + tt + 1u];
      acc[0] += a.x * b0; acc[1] += a.y * b0; acc[2] += a.z * b0; acc[3] += a.w * b0;
      acc[4] += a.x * b1; acc[5] += a.y * b1; acc[6] += a.z * b1; acc[7] += a.w * b1;
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < 8u; i++) {
    let r = row0 + tr + i % 4u;
    let t = tok0 + tt + i / 4u;
    if (r < p.rows && t < p.n_tokens) { store(r, t, acc[i]); }
  }
}
