// The chat page: streams replies from /v1/chat/completions. Model text is only ever inserted
// with textContent, so nothing the model writes is interpreted as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const history = [];
let controller = null;

// A server started with --api-key answers 401 without "Authorization: Bearer KEY": the page then
// shows a key field; the key is kept for this tab only (sessionStorage).
function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}
function askForKey() {
  $("key-label").hidden = false;
  $("api-key").focus();
}
$("api-key").value = sessionStorage.getItem("pocketlm-api-key") || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("pocketlm-api-key", $("api-key").value.trim());
  loadModelName();
});

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  conversation.appendChild(div);
  conversation.scrollTop = conversation.scrollHeight;
  return div;
}

async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(prompt) {
  history.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const reply = addMessage("assistant", "");
  reply.dataset.state = "streaming";
  controller = new AbortController();
  $("stop").disabled = false;
  $("send").disabled = true;
  let firstPiece = null, pieces = 0, tokens = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      signal: controller.signal,
      body: JSON.stringify({
        messages: history, stream: true, stream_options: { include_usage: true },
        temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) {
      if (response.status === 401) askForKey();
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    for await (const chunk of serverSentEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        reply.textContent += delta.content;
        pieces += 1;
        firstPiece = firstPiece ?? performance.now();
        const seconds = (performance.now() - firstPiece) / 1000;
        if (seconds > 0) $("speed").textContent = ((pieces - 1) / seconds).toFixed(1) + " tok/s";
        conversation.scrollTop = conversation.scrollHeight;
      }
    }
    const seconds = (performance.now() - (firstPiece ?? performance.now())) / 1000;
    if (seconds > 0) $("speed").textContent = (((tokens ?? pieces) - 1) / seconds).toFixed(1) + " tok/s";
    reply.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      reply.dataset.state = "stopped";
    } else {
      reply.dataset.state = "error";
      addMessage("error", "Error: " + err.message);
    }
  } finally {
    if (reply.dataset.state === "error") history.pop();  // the failed turn is not sent again
    else history.push({ role: "assistant", content: reply.textContent });
    controller = null;
    $("stop").disabled = true;
    $("send").disabled = false;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || controller) return;
  $("prompt").value = "";
  send(prompt);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { history.length = 0; conversation.textContent = ""; });
function loadModelName() {
  fetch("v1/models", { headers: authHeaders() }).then((r) => {
    if (r.status === 401) return askForKey();
    return r.json().then((m) => { $("model").textContent = m.data[0].id; });
  }).catch(() => {});
}
loadModelName();
