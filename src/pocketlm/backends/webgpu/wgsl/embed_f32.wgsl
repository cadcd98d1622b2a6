// out[t, :] = row step.ids[t] * id_mul + id_add of a float32 table chunk holding rows
// [row_base, row_base + rows) (id_mul / id_add: a per-layer table read as [vocab * layers, cols]);
// ids at or beyond id_limit read as id 0.
struct Params { n_tokens: u32, cols: u32, row_base: u32, rows: u32, y_off: u32, id_mul: u32, id_add: u32, id_limit: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = gid.x + gid.y * nwg.x * 64u;
  if (i >= p.n_tokens * p.cols) { return; }
  let t = i / p.cols;
  let token = select(0u, step[2u + t], step[2u + t] < p.id_limit);
  let id = token * p.id_mul + p.id_add;
  if (id < p.row_base || id >= p.row_base + p.rows) { return; }
  y[p.y_off + i] = table[(id - p.row_base) * p.cols + i % p.cols];
}
