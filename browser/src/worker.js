// The model in a Web Worker, so the page stays responsive: load a web package, then generate.
//   -> {type: "load", base}                 <- {type: "progress", text}, {type: "ready", ...}
//   -> {type: "generate", prompt, raw, maxNewTokens, temperature, topK, topP, seed, jsonSchema}
//                                           (jsonSchema: a JSON schema, object or string, the reply follows)
//                                           <- {type: "token", text}..., {type: "done", text, stats}
//   -> {type: "stop"}                       (ends the reply being generated after the current token)
//   -> {type: "reset"}                      (a new conversation)
import { Tokenizer } from "@huggingface/tokenizers";
import { PlanRunner, makeSampler, openDevice } from "./runtime.js";
import { JsonConstraint } from "./structured.js";

let runner, tokenizer, manifest, position = 0, turns = 0, pending = null;  // pending: sampled, not yet fed
let stopRequested = false;

async function load(base) {
  grammarBase = base;
  manifest = await (await fetch(base + "manifest.json")).json();
  const [tokenizerJson, tokenizerConfig] = await Promise.all(
    ["tokenizer.json", "tokenizer_config.json"].map(async (f) => (await fetch(base + f)).json()));
  tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
  const { device, description, fallback } = await openDevice();
  device.lost.then((info) => postMessage({ type: "error", message: `GPU device lost: ${info.message}` }));
  runner = await PlanRunner.load(device, base, manifest, (text) => postMessage({ type: "progress", text }));
  postMessage({ type: "ready", model: manifest.model, adapter: description, fallback, maxTokens: manifest.max_tokens });
}

function promptIds(prompt, raw) {
  let text = prompt;
  if (!raw && manifest.chat) {
    const [before, after] = turns === 0 ? manifest.chat.first : manifest.chat.next;
    text = before + prompt + after;
  }
  const ids = tokenizer.encode(text, { add_special_tokens: false }).ids;
  if (position === 0 && manifest.bos_id !== null && ids[0] !== manifest.bos_id) ids.unshift(manifest.bos_id);
  return ids;
}

let grammarBase = null;

async function generate({ prompt, raw = false, maxNewTokens = 256, temperature = 0, topK = 40, topP = 1, seed = 0, jsonSchema = null }) {
  const ids = promptIds(prompt, raw);
  if (position + ids.length + 1 > manifest.max_tokens) {
    throw new Error(`the context is full (${manifest.max_tokens} tokens); start a new chat`);
  }
  const constraint = jsonSchema === null ? null : await JsonConstraint.create(grammarBase, manifest, jsonSchema);
  const sample = makeSampler({ temperature, topK, topP, seed });
  stopRequested = false;
  const stop = new Set(manifest.stop_ids);
  const t0 = performance.now();
  // Unconstrained, the GPU chooses the candidates (argmax: the top 1) and only they are read back.
  const cut = constraint ? 0 : temperature === 0 ? 1 : topK;
  const chained = cut === 1 && runner.chains;  // greedy: steps chained on the GPU
  if (pending !== null) ids.unshift(pending);
  pending = null;
  let found = await runner.feed(ids, position, cut);  // prefill: bands of the prefill pass, then single tokens
  position += ids.length;
  const t1 = performance.now();
  const out = [];
  let shown = "";
  while (out.length < maxNewTokens) {
    if (constraint) await constraint.mask(found.logits);
    const drawn = sample(found.logits);
    const token = found.ids ? found.ids[drawn] : drawn;
    if (stop.has(token)) break;
    out.push(token);
    if (constraint) constraint.accept(token, tokenizer.decode([token], { skip_special_tokens: true }));
    const text = tokenizer.decode(out, { skip_special_tokens: true });
    if (!text.endsWith("\ufffd")) {  // never split a UTF-8 character
      if (text.length > shown.length) postMessage({ type: "token", text: text.slice(shown.length) });
      shown = text;
    }
    if (stopRequested || position + 1 >= manifest.max_tokens || out.length === maxNewTokens
        || (constraint && constraint.done)) { pending = token; break; }
    if (chained) {  // the top 1, chosen on the GPU, which feeds it to the next step there
      const next = await runner.nextGreedy(token, position++);
      if (next < 0) throw new Error("the model computed NaN or infinite logits: its weights are corrupt");
      found = { ids: [next], logits: Float32Array.of(0) };
    } else found = await runner.feed([token], position++, cut);
  }
  if (constraint) constraint.dispose();
  const t2 = performance.now();
  turns += 1;
  const text = shown;  // as Python's reply: without the bytes of a character the reply did not finish
  const stats = {
    promptTokens: ids.length, generatedTokens: out.length,
    prefillTokensPerSecond: ids.length / ((t1 - t0) / 1000),
    decodeTokensPerSecond: out.length > 1 ? (out.length - 1) / ((t2 - t1) / 1000) : 0,
  };
  postMessage({ type: "done", text, ids: out, stats, stopped: stopRequested });
}

onmessage = async ({ data }) => {
  try {
    if (data.type === "load") await load(data.base);
    else if (data.type === "generate") await generate(data);
    else if (data.type === "stop") stopRequested = true;
    else if (data.type === "reset") { position = 0; turns = 0; pending = null; }
  } catch (e) {
    postMessage({ type: "error", message: String(e && e.message || e) });
  }
};
