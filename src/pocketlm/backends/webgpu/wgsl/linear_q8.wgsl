// y[t, row_base + r] = sum_g scale[r, g] * (q[r, g*sub:(g+1)*sub] . x[t, ...]) + offset[r, g] * sum(x[t, ...])
// q: int8 weights packed four to a u32 (little-endian), [rows, cols / 4]; scale/offset: f32 [rows, cols / sub].
// Four output rows per workgroup, 16 threads splitting each row; up to 8 tokens share each weight load.
struct Params {
  rows: u32, cols: u32, sub: u32, n_tokens: u32,
  x_off: u32, x_stride: u32, y_off: u32, y_stride: u32,
  row_base: u32, has_offset: u32, pad0: u32, pad1: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<u32>;
@group(0) @binding(2) var<storage, read> scale: array<f32>;
@group(0) @binding(3) var<storage, read> offs: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

var<workgroup> part: array<f32, 512>;  // [token, row * 16 + lane]

fn int8_at(w: u32, k: u32) -> f32 {
  return f32(bitcast<i32>(w << (24u - 8u * k)) >> 24u);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let lane = lid % 16u;
  let r = (wg.x + wg.y * nwg.x) * 4u + lid / 16u;
  let words = p.cols / 4u;
  let n_sub = p.cols / p.sub;
  for (var t0 = 0u; t0 < p.n_tokens; t0 += 8u) {
    let nt = min(8u, p.n_tokens - t0);
    var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    if (r < p.rows) {
      for (var j = lane; j < words; j += 16u) {
        let w = q[r * words + j];
        let g = r * n_sub + (j * 4u) / p.sub;
        let s = scale[g];
        var o = 0.0;
        if (p.has_offset == 1u) { o = offs[g]; }
        let v = vec4<f32>(int8_at(w, 0u), int8_at(w, 1u), int8_at(w, 2u), int8_at(w, 3u));
        for (var t = 0u; t < nt; t++) {
          let b = p.x_off + (t0 + t) * p.x_stride + j * 4u;
          let xv = vec4<f32>(x[b], x[b + 1u], x[b + 2u], x[b + 3u]);
          acc[t] += s * dot(v, xv) + o * (xv.x + xv.y + xv.z + xv.w);
        }
      }
    }
    for (var t = 0u; t < nt; t++) { part[t * 64u + lid] = acc[t]; }
    workgroupBarrier();
    for (var stride = 8u; stride > 0u; stride = stride >> 1u) {
      if (lane < stride) {
        for (var t = 0u; t < nt; t++) { part[t * 64u + lid] += part[t * 64u + lid + stride]; }
      }
      workgroupBarrier();
    }
    if (r < p.rows && lane < nt) { y[p.y_off + (t0 + lane) * p.y_stride + p.row_base + r] = part[lane * 64u + lid - lane]; }
    workgroupBarrier();
  }
}
