// cache[(step.pos0 + t) * stride + i] = src[src_off + t * stride + i] for T new tokens.
struct Params { n: u32, src_off: u32, stride: u32, pad0: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read_write> cache: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = gid.x + gid.y * nwg.x * 64u;
  if (i >= p.n) { return; }
  cache[step[0] * p.stride + i] = src[p.src_off + i];
}
