// Included by linear, matmul and embed_q8: the scale and offset of sub-block g of a quantized matrix,
// held as float32 or, where half_scales, as float16 pairs (the `scale` and `offs` bindings are u32).
fn scale_at(g: u32) -> f32 {
  if (p.half_scales == 1u) { return unpack2x16float(scale[g / 2u])[g % 2u]; }
  return bitcast<f32>(scale[g]);
}

fn offset_at(g: u32) -> f32 {
  if (p.half_scales == 1u) { return unpack2x16float(offs[g / 2u])[g % 2u]; }
  return bitcast<f32>(offs[g]);
}
