// y = op(a, b): add, mul, a * s, silu(a), gelu_tanh(a), tanh(a / s) * s, gelu(a) (exact, erf from
// Abramowitz & Stegun 7.1.26, error < 1.5e-7, as the CPU backend computes it), a - b, a + s. The OP_ constants are
// the one table of op codes: the backend reads them from this file.
// b is read at i % b_len (b_len = n: same shape; b_len = row length: a bias broadcast over rows).
const OP_ADD: u32 = 0u;
const OP_MUL: u32 = 1u;
const OP_SCALE: u32 = 2u;
const OP_SILU: u32 = 3u;
const OP_GELU_TANH: u32 = 4u;
const OP_SOFTCAP: u32 = 5u;
const OP_GELU: u32 = 6u;
const OP_SUB: u32 = 7u;
const OP_SHIFT: u32 = 8u;
const OP_SILU_MUL: u32 = 9u;  // act(a) * b: a gated MLP's activation and product in one (the last codes)
const OP_GELU_TANH_MUL: u32 = 10u;
const OP_GELU_MUL: u32 = 11u;
struct Params { n: u32, op: u32, a_off: u32, b_off: u32, b_len: u32, y_off: u32, s: f32, pad0: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = gid.x + gid.y * nwg.x * 64u;
  if (i >= p.n) { return; }
  let x = a[p.a_off + i];
  var r = 0.0;
  var op = p.op;
  if (op == OP_SILU_MUL) { op = OP_SILU; }
  if (op == OP_GELU_TANH_MUL) { op = OP_GELU_TANH; }
  if (op == OP_GELU_MUL) { op = OP_GELU; }
  switch op {
    case OP_ADD: { r = x + b[p.b_off + i % p.b_len]; }
    case OP_MUL: { r = x * b[p.b_off + i % p.b_len]; }
    case OP_SUB: { r = x - b[p.b_off + i % p.b_len]; }
    case OP_SHIFT: { r = x + p.s; }
    case OP_SCALE: { r = x * p.s; }
    case OP_SILU: { r = x / (1.0 + exp(-x)); }
    case OP_GELU_TANH: {
      let inner = clamp(0.7978845608 * (x + 0.044715 * x * x * x), -15.0, 15.0);
      r = 0.5 * x * (1.0 + tanh(inner));
    }
    case OP_GELU: {
      let z = abs(x) * 0.7071067811865476;
      let t = 1.0 / (1.0 + 0.3275911 * z);
      let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
      r = 0.5 * x * (1.0 + sign(x) * (1.0 - poly * exp(-z * z)));
    }
    case OP_SOFTCAP, default: { r = tanh(clamp(x / p.s, -15.0, 15.0)) * p.s; }
  }
  if (p.op >= OP_SILU_MUL) { r = r * b[p.b_off + i % p.b_len]; }
  y[p.y_off + i] = r;
}
