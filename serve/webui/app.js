// llorch's chat page: no dependencies, no build step. Talks to this server's own API:
// GET /v1/models (the picker) and POST /v1/chat/completions (streamed: fetch + SSE parsing).
// Model text is never inserted as HTML: the markdown subset below builds DOM nodes whose text
// is set with textContent, so "<script>" in an answer shows as those characters.
"use strict";

const STORE = "llorch.chat.v1"; // localStorage: the conversation and the settings
const KEY = "llorch.apiKey"; // sessionStorage: the API key, for this tab only
const $ = (id) => document.getElementById(id);

const state = {
  messages: [], // {role, content, stats?, error?}
  model: "",
  settings: { system: "", temperature: 0.7, top_p: 1, max_tokens: "", seed: "" },
  controller: null, // the AbortController of the answer being streamed
};

// ------------------------------------------------------------------ storage

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    if (Array.isArray(saved.messages)) state.messages = saved.messages;
    if (saved.settings) Object.assign(state.settings, saved.settings);
    if (typeof saved.model === "string") state.model = saved.model;
  } catch (e) {
    localStorage.removeItem(STORE);
  }
}

function save() {
  const { messages, model, settings } = state;
  localStorage.setItem(STORE, JSON.stringify({ messages, model, settings }));
}

// ------------------------------------------------------------------ API

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// Ask for the key (a dialog); resolves true when one was given.
function askKey() {
  const dialog = $("key-dialog");
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = $("api-key").value.trim();
      if (dialog.returnValue === "ok" && key) {
        sessionStorage.setItem(KEY, key);
        resolve(true);
      } else resolve(false);
    }, { once: true });
    $("api-key").value = "";
    dialog.showModal();
  });
}

// fetch, asking for the API key and trying again once when the server answers 401.
async function api(path, init = {}) {
  for (let attempt = 0; ; attempt++) {
    const resp = await fetch(path, { ...init, headers: headers() });
    if (resp.status !== 401 || attempt > 0) return resp;
    sessionStorage.removeItem(KEY);
    if (!(await askKey())) return resp;
  }
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function loadModels() {
  const select = $("model");
  const resp = await api("/v1/models");
  if (!resp.ok) {
    $("model-status").textContent = await errorText(resp);
    return;
  }
  const models = (await resp.json()).data;
  const chosen = models.some((m) => m.id === state.model) ? state.model : (models[0] || {}).id;
  select.replaceChildren(...models.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.status && m.status !== "loaded" ? `${m.id} (${m.status})` : m.id;
    return option;
  }));
  if (chosen) select.value = chosen;
  state.model = select.value;
  describeModel(models.find((m) => m.id === select.value));
}

function describeModel(m) {
  if (!m) return;
  const parts = [m.precision, m.max_length && `${m.max_length} tokens`,
    m.memory_bytes && `${(m.memory_bytes / 2 ** 20).toFixed(0)} MiB`].filter(Boolean);
  $("model-status").textContent = parts.join(" · ");
}

// Server-sent events from a fetch body: yields each "data:" payload (a string).
async function* sse(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

// ------------------------------------------------------------------ markdown (safe subset)

// Inline: `code`, **bold**, *italic* / _italic_, [text](http(s) URL). Returns DOM nodes.
function inline(text) {
  const nodes = [];
  const pattern = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\b_([^_]+)_\b|\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g;
  let last = 0;
  for (const m of text.matchAll(pattern)) {
    if (m.index > last) nodes.push(document.createTextNode(text.slice(last, m.index)));
    let el;
    if (m[1]) { el = document.createElement("code"); el.textContent = m[2]; }
    else if (m[3]) { el = document.createElement("strong"); el.append(...inline(m[3])); }
    else if (m[4] || m[5]) { el = document.createElement("em"); el.append(...inline(m[4] || m[5])); }
    else {
      el = document.createElement("a");
      el.textContent = m[6];
      el.href = m[7];
      el.rel = "noopener noreferrer";
      el.target = "_blank";
    }
    nodes.push(el);
    last = m.index + m[0].length;
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function copyButton(getText, label) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.setAttribute("aria-label", label);
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(getText());
      button.textContent = "Copied";
    } catch (e) {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return button;
}

// Blocks: ``` fenced code (an unclosed fence runs to the end: streaming), # headings,
// - / * / 1. lists, > quotes, paragraphs. Returns a DocumentFragment.
function markdown(text) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)/);
    if (fence) {
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      i++;
      const figure = document.createElement("div");
      figure.className = "code";
      const bar = document.createElement("div");
      bar.className = "code-bar";
      const lang = document.createElement("span");
      lang.textContent = fence[2] || "code";
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = body.join("\n");
      pre.append(code);
      bar.append(lang, copyButton(() => code.textContent, "Copy code"));
      figure.append(bar, pre);
      out.append(figure);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)/);
    if (heading) {
      const h = document.createElement("h" + Math.min(6, heading[1].length + 2));
      h.append(...inline(heading[2]));
      out.append(h);
      i++;
      continue;
    }
    const item = /^\s*([-*+]|\d+[.)])\s+/;
    if (item.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = document.createElement(ordered ? "ol" : "ul");
      for (; i < lines.length && item.test(lines[i]); i++) {
        const li = document.createElement("li");
        li.append(...inline(lines[i].replace(item, "")));
        list.append(li);
      }
      out.append(list);
      continue;
    }
    if (/^>\s?/.test(line)) {
      const quote = document.createElement("blockquote");
      const body = [];
      for (; i < lines.length && /^>\s?/.test(lines[i]); i++) body.push(lines[i].replace(/^>\s?/, ""));
      quote.append(markdown(body.join("\n")));
      out.append(quote);
      continue;
    }
    if (!line.trim()) { i++; continue; }
    const p = document.createElement("p");
    const body = [];
    for (; i < lines.length && lines[i].trim() && !/^\s*(```|~~~|#{1,6}\s|>|[-*+]\s|\d+[.)]\s)/.test(lines[i]); i++) {
      body.push(lines[i]);
    }
    if (!body.length) body.push(lines[i++]);
    body.forEach((l, k) => {
      if (k) p.append(document.createElement("br"));
      p.append(...inline(l));
    });
    out.append(p);
  }
  return out;
}

// ------------------------------------------------------------------ conversation view

function statsText(s) {
  if (!s) return "";
  const parts = [];
  if (s.ttft != null) parts.push(`TTFT ${(s.ttft * 1000).toFixed(0)} ms`);
  if (s.tps != null) parts.push(`${s.tps.toFixed(1)} tokens/s`);
  if (s.tokens != null) parts.push(`${s.tokens} tokens`);
  if (s.model) parts.push(s.model);
  if (s.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function renderMessage(message, el) {
  el = el || document.createElement("article");
  el.className = "msg " + message.role + (message.error ? " error" : "");
  el.setAttribute("aria-label", message.role === "user" ? "You" : "Assistant");
  const body = document.createElement("div");
  body.className = "body";
  if (message.error) {
    body.setAttribute("role", "alert");
    body.textContent = message.error;
  } else if (message.role === "user") {
    body.textContent = message.content; // the user's own text, as typed
  } else {
    body.append(markdown(message.content));
  }
  const foot = document.createElement("footer");
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.textContent = statsText(message.stats);
  foot.append(stats);
  if (!message.error && message.content) {
    foot.append(copyButton(() => message.content, "Copy message"));
  }
  el.replaceChildren(body, foot);
  return el;
}

function renderAll() {
  $("messages").replaceChildren(...state.messages.map((m) => renderMessage(m)));
  $("empty").hidden = state.messages.length > 0;
}

function scrollDown() {
  window.scrollTo({ top: document.body.scrollHeight });
}

// ------------------------------------------------------------------ sending

function readSettings() {
  const s = state.settings;
  s.system = $("system").value;
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) s[name] = $(name).value;
  save();
}

function requestBody() {
  const s = state.settings;
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of state.messages) {
    if (!m.error && m.content) messages.push({ role: m.role, content: m.content });
  }
  const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true } };
  const number = (v) => (v === "" || v == null ? null : Number(v));
  if (number(s.temperature) != null) body.temperature = number(s.temperature);
  if (number(s.top_p) != null) body.top_p = number(s.top_p);
  if (number(s.max_tokens) != null) body.max_tokens = Math.round(number(s.max_tokens));
  if (number(s.seed) != null) body.seed = Math.round(number(s.seed));
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("model").disabled = busy;
}

async function send(text) {
  readSettings();
  state.messages.push({ role: "user", content: text });
  const answer = { role: "assistant", content: "", stats: { model: state.model } };
  state.messages.push(answer);
  renderAll();
  const view = $("messages").lastElementChild;
  view.setAttribute("aria-busy", "true");
  scrollDown();

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let first = null;
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; renderMessage(answer, view); scrollDown(); });
  };
  try {
    const resp = await api("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const data of sse(resp.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        answer.content += delta.content;
        redraw();
      }
      if (chunk.usage) answer.stats.tokens = chunk.usage.completion_tokens;
    }
  } catch (e) {
    if (e.name === "AbortError") answer.stats.stopped = true;
    else answer.error = String(e.message || e);
  } finally {
    const end = performance.now();
    if (first !== null) {
      answer.stats.ttft = (first - started) / 1000;
      const tokens = answer.stats.tokens;
      if (tokens > 1 && end > first) answer.stats.tps = (tokens - 1) / ((end - first) / 1000);
    }
    state.controller = null;
    setBusy(false);
    view.removeAttribute("aria-busy");
    renderMessage(answer, view);
    save();
    scrollDown();
    loadModels().catch(() => {});
    $("prompt").focus();
  }
}

// ------------------------------------------------------------------ wiring

function init() {
  load();
  const s = state.settings;
  $("system").value = s.system;
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) $(name).value = s[name];
  for (const name of ["system", "temperature", "top_p", "max_tokens", "seed"]) {
    $(name).addEventListener("change", readSettings);
  }
  renderAll();
  loadModels().catch((e) => { $("model-status").textContent = String(e); });

  $("model").addEventListener("change", () => { state.model = $("model").value; save(); loadModels(); });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.controller) state.controller.abort();
  });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    save();
    renderAll();
    $("prompt").focus();
  });
}

document.addEventListener("DOMContentLoaded", init);
