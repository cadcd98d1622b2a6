// Runs an exported plan: creates the buffers, fills them from the shards, compiles the WGSL
// kernels, and replays the recorded dispatches once per token (first copying in the rows of the
// tables a pass reads by rows, see tables.js). It knows no architecture.
import { RowTable } from "./tables.js";

export async function openDevice() {
  if (!navigator.gpu) throw new Error("WebGPU is not available in this browser");
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) throw new Error("no WebGPU adapter");
  const limits = {};
  for (const name of ["maxStorageBufferBindingSize", "maxBufferSize", "maxStorageBuffersPerShaderStage"]) {
    limits[name] = adapter.limits[name];
  }
  const device = await adapter.requestDevice({ requiredLimits: limits });
  const info = adapter.info || {};
  const fallback = Boolean(adapter.isFallbackAdapter || info.isFallbackAdapter);
  return { device, description: `${info.vendor || ""} ${info.architecture || ""} ${info.device || info.description || ""}`.trim(), fallback };
}

async function fetchCached(url, cacheName) {
  // shards are kept in the Cache API (localhost is a secure context), so a reload reads no network;
  // the response read is the cache's (a table file's blob stays on disk)
  if (typeof caches !== "undefined") {
    const cache = await caches.open(cacheName);
    let response = await cache.match(url);
    if (!response) {
      response = await fetch(url);
      if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
      const fetched = response.clone();
      await cache.put(url, response);
      response = (await cache.match(url)) || fetched;
    }
    return response;
  }
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response;
}

const PLAN_FORMAT = 4; // web/__init__.py's FORMAT

export class PlanRunner {
  static async load(device, base, manifest, onProgress = () => {}) {
    const plan = await (await fetch(base + "plan.json")).json();
    if (plan.format !== PLAN_FORMAT) {
      throw new Error(`this package's plan is format ${plan.format}; this runtime reads format ${PLAN_FORMAT}: export it again with this pocketlm`);
    }
    const runner = new PlanRunner(device, plan, manifest);
    const byShard = new Map();
    for (const b of plan.buffers) {
      if (b.shard) (byShard.get(b.shard) || byShard.set(b.shard, []).get(b.shard)).push(b);
    }
    const cacheName = `pocketlm-${manifest.model}-${manifest.max_tokens}`;
    const files = byShard.size + Object.values(plan.tables).reduce((n, t) => n + t.pieces.length, 0);
    let done = 0;
    for (const [shard, entries] of byShard) {
      onProgress(`fetching ${shard} (${done + 1}/${files})`);
      const data = await (await fetchCached(base + shard, cacheName)).arrayBuffer();
      for (const b of entries) device.queue.writeBuffer(runner.buffers.get(b.id), 0, data, b.offset, b.length);
      done += 1;
    }
    for (const [name, table] of Object.entries(plan.tables)) {
      const blobs = [];
      for (const piece of table.pieces) {
        onProgress(`fetching ${piece.file} (${done + 1}/${files})`);
        blobs.push(await (await fetchCached(base + piece.file, cacheName)).blob());
        done += 1;
      }
      runner.tables.set(name, new RowTable(name, table, blobs));
    }
    onProgress("compiling kernels");
    await runner.compile();
    return runner;
  }

  constructor(device, plan, manifest) {
    this.device = device;
    this.plan = plan;
    this.manifest = manifest;
    this.buffers = new Map();
    this.tables = new Map();
    for (const b of plan.buffers) {
      const usage = b.uniform
        ? GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST
        : GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;
      this.buffers.set(b.id, device.createBuffer({ size: b.size, usage }));
    }
    const counts = Object.values(plan.passes).map((p) => p.logits.count);
    this.readback = device.createBuffer({ size: Math.max(...counts) * 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    // the top-k kernels' parameters (one block per shift of a round), their output (a header and a
    // round's counts, then (id, logit) pairs from plan.top.pairs) and the copy read back
    const topBytes = 4 * (plan.top.pairs + 2 * (plan.top.max_k + plan.top.ties));
    this.topParams = new Map();
    for (const [, shift] of plan.top.passes) {
      if (!this.topParams.has(shift)) this.topParams.set(shift, device.createBuffer({ size: 32, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST }));
    }
    this.top = device.createBuffer({ size: topBytes, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC });
    // greedy steps chained on the GPU (nextGreedy): argmax's output, two read-back buffers in turn
    this.greedyOut = device.createBuffer({ size: 16, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC });
    this.greedyReads = [0, 1].map(() => device.createBuffer({ size: 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST }));
    this.flip = 0;
    this.ahead = null;
    this.topRead = device.createBuffer({ size: topBytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  }

  async compile() {
    const pipelines = {};
    for (const [name, code] of Object.entries(this.plan.kernels)) {
      const module = this.device.createShaderModule({ code });
      const entries = this.plan.bindings[name].map((type, binding) => ({ binding, visibility: GPUShaderStage.COMPUTE, buffer: { type } }));
      const layout = this.device.createBindGroupLayout({ entries });
      const pipelineLayout = this.device.createPipelineLayout({ bindGroupLayouts: [layout] });
      pipelines[name] = { layout, pipeline: await this.device.createComputePipelineAsync({ layout: pipelineLayout, compute: { module, entryPoint: "main" } }) };
    }
    this.passes = {};
    for (const [name, pass] of Object.entries(this.plan.passes)) {
      const commands = pass.dispatches.map(([kernel, params, ids, groups]) => {
        const { layout, pipeline } = pipelines[kernel];
        const entries = [params, ...ids].map((id, binding) => ({ binding, resource: { buffer: this.buffers.get(id) } }));
        return { pipeline, group: this.device.createBindGroup({ layout, entries }), groups };
      });
      const top = this.plan.top.passes.map(([kernel, shift, size]) => {
        const { layout, pipeline } = pipelines[kernel];
        const entries = [this.topParams.get(shift), this.buffers.get(pass.logits.buffer), this.top].map((buffer, binding) => ({ binding, resource: { buffer } }));
        const all = Math.ceil(pass.logits.count / this.plan.top.per_group);
        return { pipeline, group: this.device.createBindGroup({ layout, entries }), groups: size === "one" ? 1 : all, shift };
      });
      const argmax = pipelines.argmax;
      const params = this.device.createBuffer({ size: 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
      this.device.queue.writeBuffer(params, 0, new Uint32Array([pass.logits.count, pass.logits.offset, 0, 0]));
      const greedyEntries = [params, this.buffers.get(pass.logits.buffer), this.buffers.get(this.plan.step), this.greedyOut]
        .map((buffer, binding) => ({ binding, resource: { buffer } }));
      const greedy = { pipeline: argmax.pipeline, group: this.device.createBindGroup({ layout: argmax.layout, entries: greedyEntries }) };
      this.passes[name] = { tokens: pass.tokens, commands, logits: pass.logits, fills: pass.fills, top, greedy };
    }
  }

  // Feed tokens from `position` on (bands of the widest prefill pass that fits, then of the narrower
  // ones, then the decode pass token by token); returns {ids, logits} after the last one: with 0 < topK
  // < the vocabulary (at most plan.top.max_k), the topK largest logits chosen on the GPU and their ids,
  // in id order (ties at the k-th: the lower ids), else the whole row and ids null.
  async feed(tokens, position, topK = 0) {
    let found, i = 0;
    const bands = Object.values(this.passes).filter((p) => p.tokens > 1).sort((a, b) => b.tokens - a.tokens);
    const last = (n) => (i + n === tokens.length ? topK : 0);
    for (const band of bands) {
      for (; i + band.tokens <= tokens.length; i += band.tokens) {
        found = await this.run(band, tokens.slice(i, i + band.tokens), position + i, last(band.tokens));
      }
    }
    for (; i < tokens.length; i++) found = await this.run(this.passes.decode, [tokens[i]], position + i, last(1));
    return found;
  }

  // One pass over tokens at position..: writes the step buffer and the table rows it reads,
  // replays the pass, returns its last token's logits as feed does.
  async run(pass, tokens, position, topK = 0) {
    const { device, plan } = this;
    if (this.ahead) {  // the step buffer is the host's again: a greedy step run ahead is stale
      await this.ahead.value;  // (its read-back buffer is free once read)
      this.ahead = null;
    }
    device.queue.writeBuffer(this.buffers.get(plan.step), 0, new Uint32Array([position, tokens.length, ...tokens]));
    for (const fill of pass.fills) {
      const rows = await this.tables.get(fill.table).read(fill, tokens);
      device.queue.writeBuffer(this.buffers.get(fill.buffer), fill.at * 4, rows);
    }
    const { buffer, offset, count } = pass.logits;
    const cut = topK > 0 && topK < count && topK <= plan.top.max_k;
    const cap = topK + plan.top.ties;
    if (cut) {
      for (const [shift, params] of this.topParams) device.queue.writeBuffer(params, 0, new Uint32Array([count, offset, topK, cap, shift, 0, 0, 0]));
    }
    const encoder = device.createCommandEncoder();
    const compute = encoder.beginComputePass();
    for (const c of pass.commands) {
      compute.setPipeline(c.pipeline);
      compute.setBindGroup(0, c.group);
      compute.dispatchWorkgroups(c.groups[0], c.groups[1], c.groups[2]);
    }
    if (cut) {
      for (const t of pass.top) {
        compute.setPipeline(t.pipeline);
        compute.setBindGroup(0, t.group);
        compute.dispatchWorkgroups(t.groups);
      }
    }
    compute.end();
    if (cut) {
      const bytes = 4 * (plan.top.pairs + 2 * cap);
      encoder.copyBufferToBuffer(this.top, 0, this.topRead, 0, bytes);
      device.queue.submit([encoder.finish()]);
      await this.topRead.mapAsync(GPUMapMode.READ, 0, bytes);
      const raw = new Uint32Array(this.topRead.getMappedRange(0, bytes).slice(0));
      this.topRead.unmap();
      const [written, bad] = raw;
      if (!bad && written <= cap) return topOf(raw.subarray(plan.top.pairs, plan.top.pairs + 2 * written), topK);
      return { ids: null, logits: await this.read(this.device.createCommandEncoder(), buffer, offset, count) };
    }
    return { ids: null, logits: await this.read(encoder, buffer, offset, count) };
  }

  // Whether greedy steps can be chained on the GPU (the decode pass reads no table rows from the host).
  get chains() {
    return this.passes.decode.fills.length === 0;
  }

  // Greedy decoding as the native backend does it: the decode pass over `token` at `position`, then
  // argmax.wgsl, which leaves the next token and position in the step buffer, so the step after it is
  // submitted (fed on the GPU) before this one is read back. Returns the next token (-1: a logit was not
  // finite). A step submitted ahead and not asked for is left behind: the next pass writes over what it did.
  async nextGreedy(token, position) {
    let current = this.ahead;
    this.ahead = null;
    if (!current || current.token !== token || current.position !== position) {
      if (current) await current.value;  // its read-back buffer is free again once mapped and read
      this.device.queue.writeBuffer(this.buffers.get(this.plan.step), 0, new Uint32Array([position, 1, token]));
      current = { value: this.submitGreedy() };
    }
    const ahead = { value: this.submitGreedy(), position: position + 1 };
    const next = await current.value;
    this.ahead = { ...ahead, token: next };
    return next;
  }

  submitGreedy() {
    const pass = this.passes.decode;
    const encoder = this.device.createCommandEncoder();
    const compute = encoder.beginComputePass();
    for (const c of [...pass.commands, { ...pass.greedy, groups: [1, 1, 1] }]) {
      compute.setPipeline(c.pipeline);
      compute.setBindGroup(0, c.group);
      compute.dispatchWorkgroups(c.groups[0], c.groups[1], c.groups[2]);
    }
    compute.end();
    const read = this.greedyReads[(this.flip ^= 1)];
    encoder.copyBufferToBuffer(this.greedyOut, 0, read, 0, 8);
    this.device.queue.submit([encoder.finish()]);
    return read.mapAsync(GPUMapMode.READ, 0, 8).then(() => {
      const [value, bad] = new Uint32Array(read.getMappedRange(0, 8).slice(0));
      read.unmap();
      return bad ? -1 : value;
    });
  }

  // Submits `encoder` with a copy of count floats from offset of buffer `id`, and reads them back.
  async read(encoder, id, offset, count) {
    encoder.copyBufferToBuffer(this.buffers.get(id), offset * 4, this.readback, 0, count * 4);
    this.device.queue.submit([encoder.finish()]);
    await this.readback.mapAsync(GPUMapMode.READ, 0, count * 4);
    const logits = new Float32Array(this.readback.getMappedRange(0, count * 4).slice(0));
    this.readback.unmap();
    return logits;
  }
}

// The topK of topk.wgsl's (id, logit bits) pairs, every logit at or above the k-th: sorted by value
// then id, the first topK, returned in id order.
export function topOf(pairs, topK) {
  const written = pairs.length / 2;
  const values = new Float32Array(pairs.buffer, pairs.byteOffset, pairs.length);
  const order = Array.from({ length: written }, (_, j) => j);
  order.sort((a, b) => values[2 * b + 1] - values[2 * a + 1] || pairs[2 * a] - pairs[2 * b]);
  const kept = order.slice(0, topK).sort((a, b) => pairs[2 * a] - pairs[2 * b]);
  return { ids: Int32Array.from(kept, (j) => pairs[2 * j]), logits: Float32Array.from(kept, (j) => values[2 * j + 1]) };
}

// Sampling, as pocketlm.sampling does it (same order of operations, same RNG, so a seed gives the same
// text as Python): temperature 0 is argmax; otherwise the kept tokens are all of them, or where topK or
// topP cut, the first topK of the logits sorted best first (ties by id), then the prefix whose weight
// before each token is under topP of theirs; their weights exp((l - best) / temperature) are summed in
// id order and the token is the first whose running sum exceeds random() times the total.
export function mulberry32(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function makeSampler({ temperature = 0, topK = 40, topP = 1, seed = 0 } = {}) {
  const random = mulberry32(seed);
  return (input) => {
    const logits = Float64Array.from(input, (v) => (Number.isNaN(v) ? -Infinity : v));
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
    if (!(temperature > 0)) return best;
    const weight = (i) => {
      if (i === best) return 1;
      const w = Math.exp((logits[i] - logits[best]) / temperature);
      return Number.isNaN(w) ? 0 : w;
    };
    let kept = Array.from(logits.keys());
    const cutK = topK > 0 && topK < logits.length;
    if (cutK || topP < 1) {
      let order = kept.sort((a, b) => logits[b] - logits[a] || a - b);
      if (cutK) order = order.slice(0, topK);
      if (topP < 1) {
        const w = order.map(weight);
        const running = [];
        let sum = 0;
        for (const v of w) running.push((sum += v));
        const limit = topP * sum;
        let m = 0;
        for (let j = 0; j < order.length; j++) if (running[j] - w[j] < limit) m++;
        order = order.slice(0, Math.max(1, m));
      }
      kept = order.sort((a, b) => a - b);
    }
    const running = [];
    let sum = 0;
    for (const i of kept) running.push((sum += weight(i)));
    const r = random() * sum;
    for (let j = 0; j < kept.length; j++) if (running[j] > r) return kept[j];
    return kept[kept.length - 1];
  };
}
