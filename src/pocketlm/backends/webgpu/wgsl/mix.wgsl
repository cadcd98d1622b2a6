// Per-token weighted sums of K streams (Gemma 3n's AltUp): x [K, T, n], c [T, M * K] ->
// y [M, T, n], y[j, t, e] = sum_k c[t, j * K + k] * x[k, t, e]. One thread per output value.
struct Params { n: u32, n_tokens: u32, n_out: u32, n_in: u32, x_off: u32, c_off: u32, y_off: u32, pad0: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> c: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = gid.x + gid.y * nwg.x * 64u;
  if (i >= p.n_out * p.n_tokens * p.n) { return; }
  let e = i % p.n;
  let t = (i / p.n) % p.n_tokens;
  let j = i / (p.n * p.n_tokens);
  let coefs = p.c_off + (t * p.n_out + j) * p.n_in;
  var sum = 0.0;
  for (var k = 0u; k < p.n_in; k++) {
    sum += c[coefs + k] * x[p.x_off + (k * p.n_tokens + t) * p.n + e];
  }
  y[p.y_off + i] = sum;
}
