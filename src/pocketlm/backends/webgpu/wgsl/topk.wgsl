// A sampler's top-k cut without reading the logits back: of n logits, the k largest (the host takes the
// lowest ids among those equal to the k-th, as the CPU sampler does) with their ids, for the host to
// draw among. One workgroup: a radix select over the logits' order-preserving 32-bit keys, 8 bits a
// pass (the k-th largest key, digit by digit from the top), then every logit at or above it written out.
// out: [0] pairs written (more than cap: the host reads the whole row instead), [1] 1 if a logit was
// NaN or infinite, [2] the k-th largest key, [3] unused; from 4, (id, logit's bits) pairs in no order.
struct Params { n: u32, l_off: u32, k: u32, cap: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

const COPIES: u32 = 8u;  // histograms, a thread adding to copy lid % 8 (the top digits are few and busy)
var<workgroup> hist: array<atomic<u32>, 2048>;
var<workgroup> chosen: array<u32, 2>;  // the k-th key's digits found so far; how many of them to take
var<workgroup> bad: atomic<u32>;
var<workgroup> written: atomic<u32>;

// larger floats give larger keys: negatives reversed below the positives
fn key_of(bits: u32) -> u32 {
  return select(bits | 0x80000000u, ~bits, (bits & 0x80000000u) != 0u);
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
  if (lid == 0u) {
    chosen[0] = 0u;
    chosen[1] = p.k;
    atomicStore(&bad, 0u);
    atomicStore(&written, 0u);
  }
  var mask = 0u;
  let copy = (lid % COPIES) * 256u;
  for (var d = 0u; d < 4u; d++) {
    let shift = 24u - 8u * d;
    for (var j = lid; j < 2048u; j += 256u) {
      atomicStore(&hist[j], 0u);
    }
    workgroupBarrier();
    let prefix = chosen[0];
    for (var i = lid; i < p.n; i += 256u) {
      let bits = bitcast<u32>(logits[p.l_off + i]);
      if (d == 0u && (bits & 0x7f800000u) == 0x7f800000u) {
        atomicOr(&bad, 1u);
      }
      let key = key_of(bits);
      if ((key & mask) == prefix) {
        atomicAdd(&hist[copy + ((key >> shift) & 255u)], 1u);
      }
    }
    workgroupBarrier();
    var total = 0u;  // digit lid's count over the copies, left in copy 0
    for (var c = 0u; c < COPIES; c++) {
      total += atomicLoad(&hist[c * 256u + lid]);
    }
    atomicStore(&hist[lid], total);
    workgroupBarrier();
    if (lid == 0u) {  // the digit, from the top, whose count reaches the keys still to take
      var need = chosen[1];
      var digit = 0u;
      for (var b = 256u; b > 0u; b--) {
        let count = atomicLoad(&hist[b - 1u]);
        if (count >= need) {
          digit = b - 1u;
          break;
        }
        need -= count;
      }
      chosen[0] = prefix | (digit << shift);
      chosen[1] = need;
    }
    mask |= 255u << shift;
    workgroupBarrier();
  }
  let threshold = chosen[0];
  for (var i = lid; i < p.n; i += 256u) {
    let bits = bitcast<u32>(logits[p.l_off + i]);
    if (key_of(bits) >= threshold) {
      let at = atomicAdd(&written, 1u);
      if (at < p.cap) {
        out[4u + 2u * at] = i;
        out[5u + 2u * at] = bits;
      }
    }
  }
  workgroupBarrier();
  if (lid == 0u) {
    out[0] = atomicLoad(&written);
    out[1] = atomicLoad(&bad);
    out[2] = threshold;
    out[3] = 0u;
  }
}
