// A sampler's top-k cut without reading the logits back: of n logits, every one at or above the k-th
// largest, with its id, for the host to keep k of (the lowest ids among those equal to the k-th, as the
// CPU sampler does) and draw among. A radix select over the logits' order-preserving 32-bit keys, 8 bits
// a round from the top, in the dispatches TOP_K_PASSES lists (backend.py):
//   +pick with shift 32 clears the state; then for shift 24, 16, 8, 0:
//   +count (many workgroups) counts the keys that match the digits chosen so far by their next digit,
//   +pick (one workgroup) chooses the digit whose count reaches the keys still to take;
//   +gather (many workgroups) writes out each logit whose key is at or above the k-th.
// out: [0] pairs written (more than cap: the host reads the whole row instead), [1] 1 if a logit was
// NaN or infinite, [2] the k-th largest key (its digits so far), [3] how many equal to it to take,
// [4, 260) the counts of a round; from 260, (id, logit's bits) pairs in no order.
struct Params { n: u32, l_off: u32, k: u32, cap: u32, shift: u32, pad0: u32, pad1: u32, pad2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<atomic<u32>>;

const TOP_PER_GROUP: u32 = 4096u;  // logits a workgroup of +count and +gather reads (16 a thread)
const HIST: u32 = 4u;  // where a round's 256 counts are
const TOP_PAIRS: u32 = 260u;

// larger floats give larger keys: negatives reversed below the positives; -0 is 0 (equal, as on the host)
fn key_of(raw: u32) -> u32 {
  let bits = select(raw, 0u, raw == 0x80000000u);
  return select(bits | 0x80000000u, ~bits, (bits & 0x80000000u) != 0u);
}

#if count
var<workgroup> hist: array<atomic<u32>, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>,
        @builtin(num_workgroups) groups: vec3<u32>) {
  atomicStore(&hist[lid], 0u);
  workgroupBarrier();
  let prefix = atomicLoad(&out[2]);
  let mask = select(0xffffffffu << (p.shift + 8u), 0u, p.shift >= 24u);
  let first = (wg.x + wg.y * groups.x) * TOP_PER_GROUP;
  var flag = 0u;
  for (var j = 0u; j < TOP_PER_GROUP; j += 1024u) {  // four loads in flight a thread
    var bits: array<u32, 4>;
    for (var u = 0u; u < 4u; u++) {
      bits[u] = bitcast<u32>(logits[p.l_off + min(first + j + 256u * u + lid, p.n - 1u)]);
    }
    for (var u = 0u; u < 4u; u++) {
      if (first + j + 256u * u + lid < p.n) {
        flag |= u32((bits[u] & 0x7f800000u) == 0x7f800000u);
        let key = key_of(bits[u]);
        if ((key & mask) == prefix) {
          atomicAdd(&hist[(key >> p.shift) & 255u], 1u);
        }
      }
    }
  }
  if (flag != 0u && p.shift == 24u) {
    atomicOr(&out[1], 1u);
  }
  workgroupBarrier();
  let count = atomicLoad(&hist[lid]);
  if (count != 0u) {
    atomicAdd(&out[HIST + lid], count);
  }
}
#elif pick
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
  if (p.shift >= 32u) {  // the first: a clear state
    if (lid < 4u) {
      atomicStore(&out[lid], select(0u, p.k, lid == 3u));
    }
    atomicStore(&out[HIST + lid], 0u);
    return;
  }
  if (lid == 0u) {  // from the top, the digit whose count reaches the keys still to take
    var need = atomicLoad(&out[3]);
    var digit = 0u;
    for (var b = 256u; b > 0u; b--) {
      let count = atomicLoad(&out[HIST + b - 1u]);
      if (count >= need) {
        digit = b - 1u;
        break;
      }
      need -= count;
    }
    atomicOr(&out[2], digit << p.shift);
    atomicStore(&out[3], need);
  }
  storageBarrier();
  workgroupBarrier();
  atomicStore(&out[HIST + lid], 0u);
}
#elif gather
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>,
        @builtin(num_workgroups) groups: vec3<u32>) {
  let threshold = atomicLoad(&out[2]);
  let first = (wg.x + wg.y * groups.x) * TOP_PER_GROUP;
  for (var j = 0u; j < TOP_PER_GROUP; j += 1024u) {
    var bits: array<u32, 4>;
    for (var u = 0u; u < 4u; u++) {
      bits[u] = bitcast<u32>(logits[p.l_off + min(first + j + 256u * u + lid, p.n - 1u)]);
    }
    for (var u = 0u; u < 4u; u++) {
      let i = first + j + 256u * u + lid;
      if (i < p.n && key_of(bits[u]) >= threshold) {
        let at = atomicAdd(&out[0], 1u);
        if (at < p.cap) {
          atomicStore(&out[TOP_PAIRS + 2u * at], i);
          atomicStore(&out[TOP_PAIRS + 2u * at + 1u], bits[u]);
        }
      }
    }
  }
}
#endif
