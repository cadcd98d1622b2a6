// The chat page: talks to the model's worker; text is only ever set with textContent.
const $ = (id) => document.getElementById(id);
const worker = new Worker("worker.js", { type: "module" });
const pending = [];  // resolvers of generate() calls, in order

function add(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("log").append(div);
  return div;
}

let current = null;
worker.onmessage = ({ data }) => {
  if (data.type === "progress") $("status").textContent = data.text;
  else if (data.type === "ready") {
    $("status").textContent = `WebGPU: ${data.adapter || "adapter"}` + (data.fallback ? " (a software fallback adapter: slow)" : "");
    $("status").className = data.fallback ? "warn" : "";
    $("model").textContent = `${data.model}, context ${data.maxTokens} tokens`;
    for (const id of ["prompt", "send", "new"]) $(id).disabled = false;
    document.body.dataset.state = "ready";
  } else if (data.type === "token") {
    if (current) current.textContent += data.text;
  } else if (data.type === "done") {
    const s = data.stats;
    $("speed").textContent = `${s.promptTokens} prompt tokens at ${s.prefillTokensPerSecond.toFixed(1)} tok/s, ` +
      `${s.generatedTokens} generated at ${s.decodeTokensPerSecond.toFixed(1)} tok/s`;
    $("send").disabled = false;
    $("stop").disabled = true;
    if (current) current.dataset.state = data.stopped ? "stopped" : "done";
    current = null;
    pending.shift()?.resolve(data);
  } else if (data.type === "error") {
    $("status").textContent = `error: ${data.message}`;
    $("status").className = "warn";
    document.body.dataset.state = "error";
    $("send").disabled = false;
    $("stop").disabled = true;
    pending.shift()?.reject(new Error(data.message));
  }
};

function generate(prompt, options = {}) {
  current = add("assistant", "");
  $("send").disabled = true;
  $("stop").disabled = false;
  return new Promise((resolve, reject) => {
    pending.push({ resolve, reject });
    worker.postMessage({ type: "generate", prompt, ...options });
  });
}

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  add("user", prompt);
  $("prompt").value = "";
  generate(prompt, { raw: $("raw").checked, temperature: Number($("temperature").value),
                     maxNewTokens: Number($("max-new").value), seed: Date.now() % 1e9 });
});
$("stop").addEventListener("click", () => worker.postMessage({ type: "stop" }));
$("new").addEventListener("click", () => { worker.postMessage({ type: "reset" }); $("log").replaceChildren(); });

// For scripts and tests: window.pocketlm.generate(prompt, {raw, temperature, topK, topP, seed, maxNewTokens, jsonSchema})
// -> {text, ids, stats}; a seed gives the text Python's sampler gives with the same options
window.pocketlm = { generate, stop: () => worker.postMessage({ type: "stop" }), reset: () => worker.postMessage({ type: "reset" }) };
worker.postMessage({ type: "load", base: new URL("model/", location.href).href });
