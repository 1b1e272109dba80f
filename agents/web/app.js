// Atelier chat page: streams /v1/chat/completions (OpenAI-compatible SSE) and keeps the
// conversation in localStorage. All model and source text goes into the DOM through
// textContent, never innerHTML (OWASP LLM05: improper output handling).
"use strict";

const STORE_KEY = "atelier.chat.v1";
const API_KEY_KEY = "atelier.apiKey";
const MODEL = "atelier";

// ---------- state (one object, saved whole) ----------

function newThreadId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return "t-" + Date.now().toString(36) + Math.random().toString(36).slice(2);
}

function loadState() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE_KEY));
    if (saved && typeof saved.threadId === "string" && Array.isArray(saved.messages)) return saved;
  } catch (_) { /* corrupt or absent: start fresh */ }
  return { threadId: newThreadId(), messages: [] };
}

let state = loadState();
const saveState = () => localStorage.setItem(STORE_KEY, JSON.stringify(state));

// ---------- HTTP ----------

function headers(extra) {
  const h = Object.assign({ "Content-Type": "application/json" }, extra || {});
  const key = localStorage.getItem(API_KEY_KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      return body.error.message + (response.status === 401 ? " (set the API key under Settings)" : "");
    }
  } catch (_) { /* not JSON */ }
  return "HTTP " + response.status + " " + response.statusText;
}

// Yields each parsed `data:` payload of a text/event-stream body; stops at [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  try {
    yield* dataPayloads(reader);
  } finally {
    reader.cancel().catch(() => {});  // stopped early ([DONE] or an error): let the connection go
  }
}

async function* dataPayloads(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
    if (done) return;
  }
}

// ---------- rendering (DOM built with textContent only) ----------

const $ = (id) => document.getElementById(id);

function el(tag, props, children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children || []) if (child) node.append(child);
  return node;
}

function renderMeta(msg, view) {
  view.meta.replaceChildren();
  if (msg.route) view.meta.append(el("span", { class: "badge route", text: msg.route, title: "Route" }));
  if (typeof msg.confidence === "number") {
    view.meta.append(el("span", {
      class: "confidence", text: Math.round(msg.confidence * 100) + "%", title: "Router confidence",
    }));
  }
  const timings = timingText(msg.timings);
  if (timings) {
    view.meta.append(el("span", { class: "timings", text: timings, title: "Time this answer spent on each step" }));
  }
}

// "route 12 ms · search 31 ms · model 840 ms": the steps that took any time, in the order they run.
const TIMING_KINDS = ["route", "search", "model", "tool"];
function timingText(timings) {
  if (!timings || typeof timings !== "object") return "";
  return TIMING_KINDS.filter((k) => typeof timings[k] === "number" && timings[k] > 0)
    .map((k) => k + " " + (timings[k] < 1 ? "<1" : Math.round(timings[k])) + " ms").join(" · ");
}

function renderSources(msg, view) {
  view.sources.replaceChildren();
  if (!msg.sources || !msg.sources.length) return;
  const items = msg.sources.map((s) => el("li", { class: "source" }, [
    el("div", { class: "source-head" }, [
      el("span", { class: "source-n", text: "[" + s.n + "]" }),
      el("span", { class: "source-title", text: s.title || "" }),
      el("code", { class: "source-path", text: s.source || "" }),
    ]),
    el("blockquote", { class: "source-text", text: s.text || "" }),
  ]));
  view.sources.append(el("details", { class: "sources" }, [
    el("summary", { text: "Sources (" + msg.sources.length + ")" }),
    el("ol", {}, items),
  ]));
}

function renderError(msg, view) {
  view.error.textContent = msg.error || "";
  view.error.hidden = !msg.error;
}

// Thumb icon as inline SVG (Material "thumb_up" path, Apache-2.0): emoji need a font the
// machine may not have. Thumbs down is the same icon turned over in CSS.
const THUMB_PATH = "M1 21h4V9H1v12zm22-11c0-1.1-.9-2-2-2h-6.31l.95-4.57.03-.32c0-.41-.17-.79-.44-1.06"
  + "L14.17 1 7.59 7.59C7.22 7.95 7 8.45 7 9v10c0 1.1.9 2 2 2h9c.83 0 1.54-.5 1.84-1.22"
  + "l3.02-7.05c.09-.23.14-.47.14-.73v-2z";

function thumbIcon() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("class", "icon");
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", THUMB_PATH);
  svg.append(path);
  return svg;
}

function renderFeedback(msg, view) {
  view.feedback.replaceChildren();
  if (!msg.completionId) return;
  for (const [rating, label] of [["up", "Good answer"], ["down", "Bad answer"]]) {
    const pressed = msg.feedback === rating;
    const button = el("button", {
      type: "button", class: "thumb " + rating, "aria-label": label,
      "aria-pressed": String(pressed), "data-rating": rating, title: label,
    }, [thumbIcon()]);
    if (pressed) button.append(el("span", { text: "Recorded" }));
    // Thumbs down first asks what the answer should have said (optional): `specialist improve` trains on it.
    button.addEventListener("click", () => rating === "down" ? openCorrection(msg, view) : sendFeedback(msg, rating, view));
    view.feedback.append(button);
  }
  if (msg.correcting) view.feedback.append(correctionForm(msg, view));
}

function openCorrection(msg, view) {
  msg.correcting = true;
  renderFeedback(msg, view);
}

function correctionForm(msg, view) {
  const box = el("textarea", {
    class: "correction", rows: "2", maxlength: "4000", "aria-label": "What should it have said?",
    placeholder: "What should it have said? (optional)",
  });
  const send = el("button", { type: "button", text: "Send" });
  const cancel = el("button", { type: "button", text: "Cancel" });
  send.addEventListener("click", () => sendFeedback(msg, "down", view, box.value.trim()));
  cancel.addEventListener("click", () => { msg.correcting = false; renderFeedback(msg, view); });
  setTimeout(() => box.focus(), 0);
  return el("div", { class: "correction-form", role: "group", "aria-label": "Correct this answer" }, [box, send, cancel]);
}

function renderMessage(msg) {
  const view = {
    content: el("div", { class: "content", text: msg.content || "" }),
    meta: el("div", { class: "meta" }),
    sources: el("div", {}),
    error: el("p", { class: "error", role: "alert" }),
    feedback: el("div", { class: "feedback", role: "group", "aria-label": "Rate this answer" }),
  };
  const who = msg.role === "user" ? "You" : "Atelier";
  view.item = el("li", { class: "message " + msg.role, "data-state": msg.pending ? "streaming" : "done" }, [
    el("div", { class: "who", text: who }), view.meta, view.content, view.sources, view.error, view.feedback,
  ]);
  renderMeta(msg, view);
  renderSources(msg, view);
  renderError(msg, view);
  renderFeedback(msg, view);
  $("messages").append(view.item);
  $("empty-hint").hidden = true;
  return view;
}

function renderAll() {
  $("messages").replaceChildren();
  $("empty-hint").hidden = state.messages.length > 0;
  state.messages.forEach(renderMessage);
  scrollToEnd();
}

// The newest text stays in view, unless the reader has scrolled up to read something else:
// callers ask atEnd() before they add text and scroll only if it was true.
const pane = () => document.querySelector("main");
const atEnd = () => pane().scrollHeight - pane().scrollTop - pane().clientHeight < 80;
const scrollToEnd = () => { pane().scrollTop = pane().scrollHeight; };

// ---------- actions ----------

function applyAtelier(msg, atelier) {
  if (!atelier) return;
  if (atelier.route) msg.route = atelier.route;
  if (typeof atelier.confidence === "number") msg.confidence = atelier.confidence;
  if (Array.isArray(atelier.sources)) msg.sources = atelier.sources;
  if (atelier.timings && typeof atelier.timings === "object") msg.timings = atelier.timings;
  if (atelier.thread_id) state.threadId = atelier.thread_id;
}

async function streamAnswer(text, msg, view) {
  const response = await fetch("v1/chat/completions", {
    method: "POST",
    headers: headers({ "X-Atelier-Thread": state.threadId, Accept: "text/event-stream" }),
    body: JSON.stringify({ model: MODEL, messages: [{ role: "user", content: text }], stream: true }),
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  for await (const chunk of sseEvents(response)) {
    if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
    applyAtelier(msg, chunk.atelier);
    const choice = (chunk.choices || [])[0] || {};
    const delta = (choice.delta || {}).content;
    if (delta) {
      msg.content += delta;
      const follow = atEnd();
      view.content.textContent = msg.content;
      if (follow) scrollToEnd();
    }
    if (choice.finish_reason) msg.completionId = chunk.id;
    renderMeta(msg, view);
  }
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  renderMessage(state.messages[state.messages.length - 1]);
  const msg = { role: "assistant", content: "", pending: true };
  state.messages.push(msg);
  const view = renderMessage(msg);
  scrollToEnd();
  $("messages").setAttribute("aria-busy", "true");
  setBusy(true);
  try {
    await streamAnswer(text, msg, view);
  } catch (err) {
    msg.error = err.message || String(err);
  } finally {
    const follow = atEnd();
    delete msg.pending;
    view.item.setAttribute("data-state", msg.error ? "error" : "done");
    renderSources(msg, view);
    renderError(msg, view);
    renderFeedback(msg, view);
    if (follow) scrollToEnd();
    $("messages").setAttribute("aria-busy", "false");
    setBusy(false);
    saveState();
  }
}

async function sendFeedback(msg, rating, view, correction) {
  msg.error = "";
  const body = { thread_id: state.threadId, completion_id: msg.completionId, rating };
  if (correction) body.correction = correction;
  try {
    const response = await fetch("v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorMessage(response));
    msg.feedback = rating;
    msg.correcting = false;
    if (correction) msg.correction = correction;
  } catch (err) {
    msg.error = "Feedback not recorded: " + (err.message || String(err));
  }
  renderFeedback(msg, view);
  renderError(msg, view);
  saveState();
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("prompt").setAttribute("aria-disabled", String(busy));
}

// ---------- wiring ----------

function submitPrompt() {
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text || $("send").disabled) return;
  prompt.value = "";
  send(text);
}

document.addEventListener("DOMContentLoaded", () => {
  // A reload mid-stream leaves a pending answer behind: mark it as cut off.
  for (const m of state.messages) {
    if (m.pending) { delete m.pending; m.error = m.error || "Answer interrupted (page reloaded)."; }
  }
  renderAll();

  $("composer").addEventListener("submit", (e) => { e.preventDefault(); submitPrompt(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submitPrompt(); }
  });
  $("new-conversation").addEventListener("click", () => {
    state = { threadId: newThreadId(), messages: [] };
    saveState();
    renderAll();
    $("prompt").focus();
  });

  $("api-key").value = localStorage.getItem(API_KEY_KEY) || "";
  $("settings-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(API_KEY_KEY, key); else localStorage.removeItem(API_KEY_KEY);
    $("settings-status").textContent = key ? "Saved." : "Cleared.";
  });
  $("prompt").focus();
});
