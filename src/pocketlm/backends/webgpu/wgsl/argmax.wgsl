// Greedy decoding without the host: the index of the largest of n logits (the first of equals, as
// numpy's argmax) becomes the next step's token: step.ids[0] = it and step.pos0 += 1, so the next
// replayed step reads it; out = [token, 1 if a logit was NaN or infinite]. One workgroup.
struct Params { n: u32, l_off: u32, pad0: u32, pad1: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> step: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

var<workgroup> best: array<f32, 256>;
var<workgroup> at: array<u32, 256>;
var<workgroup> bad: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
  var b = -3.4e38;
  var i_b = 0xffffffffu;
  var flag = 0u;
  for (var i = lid; i < p.n; i += 256u) {
    let v = logits[p.l_off + i];
    if (v != v || abs(v) > 3.4e38) { flag = 1u; }
    if (v > b || i_b == 0xffffffffu) { b = v; i_b = i; }
  }
  best[lid] = b;
  at[lid] = i_b;
  bad[lid] = flag;
  workgroupBarrier();
  for (var s = 128u; s > 0u; s = s >> 1u) {
    if (lid < s) {
      let v = best[lid + s];
      let j = at[lid + s];
      if (v > best[lid] || (v == best[lid] && j < at[lid])) { best[lid] = v; at[lid] = j; }
      bad[lid] = bad[lid] | bad[lid + s];
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    step[2] = at[0];
    step[0] = step[0] + 1u;
    out[0] = at[0];
    out[1] = bad[0];
  }
}
