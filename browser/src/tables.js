// Tables a plan reads a few rows of per token (Gemma 3n's and Gemma 4's per-layer inputs, gigabytes
// in the released models): never a GPU buffer. Their rows stay in the package's table files, in the
// GGUF file's own encoding, kept as the Cache API's Blobs (never read whole into the page's memory:
// a slice of one reads only its bytes); the rows a pass needs are read and dequantized to float32
// exactly as pocketlm.formats.quants.dequantize does (every float32 operation rounded as numpy's).

const f32 = Math.fround;

export function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const mantissa = h & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 31) return mantissa ? NaN : sign * Infinity;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

// ggml type id -> [values per block, bytes per block, decode(bytes, block start, out, out start)]
const half = (b, at) => halfToFloat(b[at] | (b[at + 1] << 8));
const u32 = (b, at) => (b[at] | (b[at + 1] << 8) | (b[at + 2] << 16) | (b[at + 3] << 24)) >>> 0;

function run32(out, o, scale, offset, q) {  // 32 values scale * q[j] + offset
  for (let j = 0; j < 32; j++) out[o + j] = offset === null ? f32(q(j) * scale) : f32(f32(q(j) * scale) + offset);
}

// Q4_K / Q5_K: eight sub-blocks of 32, six-bit scales and mins packed in 12 bytes (get_scale_min_k4)
function kScales(b, at) {
  const sc = new Array(8), mn = new Array(8);
  for (let i = 0; i < 4; i++) {
    sc[i] = b[at + i] & 63;
    mn[i] = b[at + 4 + i] & 63;
    sc[4 + i] = (b[at + 8 + i] & 0x0f) | ((b[at + i] >> 6) << 4);
    mn[4 + i] = (b[at + 8 + i] >> 4) | ((b[at + 4 + i] >> 6) << 4);
  }
  return [sc, mn];
}

function kQuant(b, at, out, o, highBits) {
  const d = half(b, at), dmin = half(b, at + 2);
  const [sc, mn] = kScales(b, at + 4);
  const qs = at + (highBits ? 48 : 16);
  for (let sub = 0; sub < 8; sub++) {
    const group = qs + (sub >> 1) * 32, shift = sub & 1 ? 4 : 0;
    const q = (j) => ((b[group + j] >> shift) & 0x0f) | (highBits ? ((b[at + 16 + j] >> sub) & 1) << 4 : 0);
    run32(out, o + 32 * sub, f32(d * sc[sub]), -f32(dmin * mn[sub]), q);
  }
}

function q6K(b, at, out, o) {
  const d = half(b, at + 208);
  for (let h = 0; h < 2; h++) {
    for (let r = 0; r < 4; r++) {
      for (let l = 0; l < 32; l++) {
        const low = (b[at + h * 64 + (r & 1) * 32 + l] >> (r & 2 ? 4 : 0)) & 0x0f;
        const high = (b[at + 128 + h * 32 + l] >> (2 * r)) & 3;
        const index = h * 128 + r * 32 + l;
        const scale = (b[at + 192 + (index >> 4)] << 24) >> 24;  // int8
        out[o + index] = f32(((low | (high << 4)) - 32) * f32(d * scale));
      }
    }
  }
}

const nibble = (b, qs, j) => (j < 16 ? b[qs + j] & 0x0f : b[qs + j - 16] >> 4);
const fifth = (b, at, j) => ((u32(b, at) >>> j) & 1) << 4;

export const BLOCKS = {
  0: [1, 4, (b, at, out, o) => { out[o] = new DataView(b.buffer, b.byteOffset + at, 4).getFloat32(0, true); }],
  1: [1, 2, (b, at, out, o) => { out[o] = half(b, at); }],
  30: [1, 2, (b, at, out, o) => { out[o] = new DataView(new Uint32Array([(b[at] | (b[at + 1] << 8)) << 16]).buffer).getFloat32(0, true); }],
  8: [32, 34, (b, at, out, o) => run32(out, o, half(b, at), null, (j) => (b[at + 2 + j] << 24) >> 24)],
  2: [32, 18, (b, at, out, o) => run32(out, o, half(b, at), null, (j) => nibble(b, at + 2, j) - 8)],
  3: [32, 20, (b, at, out, o) => run32(out, o, half(b, at), half(b, at + 2), (j) => nibble(b, at + 4, j))],
  6: [32, 22, (b, at, out, o) => run32(out, o, half(b, at), null, (j) => (nibble(b, at + 6, j) | fifth(b, at + 2, j)) - 16)],
  7: [32, 24, (b, at, out, o) => run32(out, o, half(b, at), half(b, at + 2), (j) => nibble(b, at + 8, j) | fifth(b, at + 4, j))],
  12: [256, 144, (b, at, out, o) => kQuant(b, at, out, o, false)],
  13: [256, 176, (b, at, out, o) => kQuant(b, at, out, o, true)],
  14: [256, 210, q6K],
};

// The values of `bytes` (whole blocks of ggml type `type`) into out[o...].
export function dequantize(type, bytes, out, o = 0) {
  const layout = BLOCKS[type];
  if (!layout) throw new Error(`this runtime cannot read tables of ggml type ${type}`);
  const [values, size, decode] = layout;
  for (let at = 0, k = o; at < bytes.length; at += size, k += values) decode(bytes, at, out, k);
  return out;
}

export class RowTable {
  // description: the plan's entry (type, rows, cols, row_bytes, pieces); blobs: one per piece
  constructor(name, description, blobs) {
    this.name = name;
    Object.assign(this, description);
    this.blobs = blobs;
    if (!BLOCKS[this.type]) throw new Error(`table ${name}: this runtime cannot read ggml type ${this.type}`);
  }

  // The rows a fill reads for `tokens` (row = token * stride + offset, token 0 at or past the limit),
  // as float32, one after another.
  async read(fill, tokens) {
    const out = new Float32Array(tokens.length * this.cols);
    await Promise.all(tokens.map(async (token, i) => {
      const row = (token < fill.limit ? token : 0) * fill.stride + fill.offset;
      if (!(row >= 0 && row < this.rows)) {
        throw new Error(`table ${this.name} has ${this.rows} rows but row ${row} was asked for`);
      }
      let p = this.pieces.length - 1;
      while (this.pieces[p].first_row > row) p--;
      const start = (row - this.pieces[p].first_row) * this.row_bytes;
      const bytes = new Uint8Array(await this.blobs[p].slice(start, start + this.row_bytes).arrayBuffer());
      dequantize(this.type, bytes, out, i * this.cols);
    }));
    return out;
  }
}
