// Included by linear and matmul: writes one output of a product, its row placed in its segment of
// stacked matrices, bias and residual added (the kernels' Params carry the fields named here).
// y at output row r (of this dispatch) of token t: segment, bias, residual
fn store(r: u32, t: u32, sum: f32) {
  let R = p.row_base + r;
  var start = 0u;
  var n = p.seg1;
  var off = p.y_off0;
  if (R >= p.seg2) { start = p.seg2; n = p.seg3 - p.seg2; off = p.y_off2; }
  else if (R >= p.seg1) { start = p.seg1; n = p.seg2 - p.seg1; off = p.y_off1; }
  let i = t * n + R - start;
  var value = sum;
  if (p.has_bias == 1u) { value += bias[R]; }
  if (p.has_res == 1u) { value += res[p.res_off + i]; }
  y[off + i] = value;
}
