// Included by linear, matmul and embed_q8: the scales and offsets of sub-blocks of a quantized matrix,
// held as float32 or, where half_scales, as float16 pairs (the `scale` and `offs` bindings are u32).
fn scale_at(g: u32) -> f32 {
  if (p.half_scales == 1u) {
    let pair = unpack2x16float(scale[g / 2u]);
    return select(pair.x, pair.y, (g & 1u) == 1u);
  }
  return bitcast<f32>(scale[g]);
}

fn offset_at(g: u32) -> f32 {
  if (p.half_scales == 1u) {
    let pair = unpack2x16float(offs[g / 2u]);
    return select(pair.x, pair.y, (g & 1u) == 1u);
  }
  return bitcast<f32>(offs[g]);
}

// sub-blocks g and g + 1, g even (a matrix holds float16 scales only with an even number a row)
fn scale_pair(g: u32) -> vec2<f32> {
  if (p.half_scales == 1u) { return unpack2x16float(scale[g / 2u]); }
  return vec2<f32>(bitcast<f32>(scale[g]), bitcast<f32>(scale[g + 1u]));
}

fn offset_pair(g: u32) -> vec2<f32> {
  if (p.half_scales == 1u) { return unpack2x16float(offs[g / 2u]); }
  return vec2<f32>(bitcast<f32>(offs[g]), bitcast<f32>(offs[g + 1u]));
}
