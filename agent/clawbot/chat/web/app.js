// clawbot chat UI: plain JS, no build step. Talks to the chat node's own API (same origin).
"use strict";

const $ = (id) => document.getElementById(id);
const SOURCE_LABELS = {
  model: "model",
  knowledge_base: "knowledge base",
  web_search: "web search",
  none: "not answered",
};

const state = { current: null, conversations: [], sending: false, status: null };

// ---------------------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key === "text") node.textContent = value;
    else node[key] = value;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    ...options,
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response.status === 204 ? null : response.json();
}

function when(seconds) {
  const date = new Date(seconds * 1000);
  const today = new Date();
  return date.toDateString() === today.toDateString()
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric" });
}

function showBanner(text, kind = "warn") {
  const banner = $("banner");
  if (!text) { banner.hidden = true; return; }
  banner.textContent = text;
  banner.dataset.kind = kind;
  banner.hidden = false;
}

// ---------------------------------------------------------------------------- status strip

async function refreshStatus() {
  let status;
  try {
    status = await api("/api/status");
  } catch (err) {
    setNode("status-chat", "down", "Chat node", "the chat node does not answer: " + err.message);
    setNode("status-model", "unknown", "Model", "unknown while the chat node is down");
    showBanner("The chat node cannot be reached. Check that the clawbot chat agent is running; this page retries every 10 s.", "error");
    return;
  }
  state.status = status;
  setNode("status-chat", status.chat.state === "ok" ? "up" : "degraded", "Chat node",
    status.chat.state === "ok" ? "database ok" : status.chat.database);
  const gw = status.gateway;
  if (gw.ready) {
    setNode("status-model", "up", "Model", `${gw.endpoint}: ready`);
    showBanner(null);
  } else {
    setNode("status-model", gw.reachable ? "degraded" : "down", "Model", gw.error || "not ready");
    const fallbacks = (status.fallback_strategies || []).map((s) => SOURCE_LABELS[s] || s);
    const then = fallbacks.length
      ? ` Questions are answered from ${fallbacks.join(", then ")} until it is back.`
      : " Questions cannot be answered until it is back.";
    showBanner(`The model node is unavailable: ${gw.error || "not ready"}.${then}`, "warn");
  }
}

function setNode(id, nodeState, label, detail) {
  const node = $(id);
  node.dataset.state = nodeState;
  node.title = detail || "";
  node.lastChild.textContent = `${label}: ${{ up: "ok", down: "down", degraded: "not ready", unknown: "…" }[nodeState]}`;
}

// ---------------------------------------------------------------------------- conversation list

async function loadConversations() {
  state.conversations = await api("/api/conversations");
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of state.conversations) {
    const open = el("button", { class: "open", type: "button", title: conv.title },
      el("span", { class: "title", text: conv.title }),
      el("span", { class: "meta", text: `${conv.message_count} msg · ${when(conv.updated_at)}` }));
    open.addEventListener("click", () => selectConversation(conv.id));
    const remove = el("button", { class: "delete icon-button", type: "button", title: "Delete conversation", text: "✕" });
    remove.setAttribute("aria-label", `Delete conversation ${conv.title}`);
    remove.addEventListener("click", () => deleteConversation(conv));
    list.append(el("li", { class: conv.id === state.current ? "active" : "" }, open, remove));
  }
}

async function deleteConversation(conv) {
  if (!confirm(`Delete “${conv.title}”? This cannot be undone.`)) return;
  await api(`/api/conversations/${conv.id}`, { method: "DELETE" });
  if (state.current === conv.id) { state.current = null; location.hash = ""; renderMessages([]); }
  await loadConversations();
}

async function selectConversation(id) {
  state.current = id;
  location.hash = `c=${id}`;
  document.body.classList.remove("nav-open");
  $("menu").setAttribute("aria-expanded", "false");
  try {
    const conv = await api(`/api/conversations/${id}`);
    renderMessages(conv.messages);
  } catch (err) {
    state.current = null;
    showBanner(`Could not open the conversation: ${err.message}`, "error");
  }
  await loadConversations();
}

// ---------------------------------------------------------------------------- messages

function position(m) { return m.role === "summary" ? m.covers_from : m.id; }

function renderMessages(messages) {
  const box = $("messages");
  box.replaceChildren();
  const top = messages.filter((m) => m.summary_id == null).sort((a, b) => position(a) - position(b) || a.id - b.id);
  for (const m of top) box.append(renderOne(m, messages));
  if (!top.length) box.append(el("p", { class: "empty", text: "Start a conversation: type a question below." }));
  box.scrollTop = box.scrollHeight;
}

function renderOne(m, all) {
  if (m.role === "summary") return renderSummary(m, all);
  const bubble = el("div", { class: "text", text: m.content });
  const article = el("article", { class: `message ${m.role}`, "data-id": String(m.id), "data-status": m.status }, bubble);
  if (m.role === "assistant") {
    article.dataset.source = m.source || "none";
    article.append(footer(m));
  } else if (m.status === "rejected") {
    article.append(el("div", { class: "note", text: "not sent to the model (too long)" }));
  }
  return article;
}

function footer(m) {
  const foot = el("div", { class: "footer" });
  const source = m.source || "none";
  foot.append(el("span", { class: `label source-${source}`, text: SOURCE_LABELS[source] || source }));
  if (m.status === "incomplete") foot.append(el("span", { class: "label warn", text: "incomplete" }));
  const meta = m.meta || {};
  if (meta.model_error && source !== "model") foot.append(el("span", { class: "why", text: `model unavailable: ${meta.model_error}` }));
  if (meta.error && m.status === "incomplete") foot.append(el("span", { class: "why", text: meta.error }));
  for (const c of meta.citations || []) {
    if (c.url) {
      foot.append(el("a", { class: "cite", href: c.url, rel: "noopener noreferrer", target: "_blank", text: c.title || c.url }));
    } else {
      foot.append(el("span", { class: "cite", text: `${c.source} § ${c.heading}` }));
    }
  }
  if (meta.prompt_tokens != null) foot.append(el("span", { class: "tokens", text: `${meta.prompt_tokens}/${meta.budget} prompt tokens` }));
  return foot;
}

function coveredCount(summary, all) {
  // conversation messages behind a summary, through the summaries nested in it
  return all.filter((o) => o.summary_id === summary.id)
    .reduce((n, o) => n + (o.role === "summary" ? coveredCount(o, all) : 1), 0);
}

function renderSummary(m, all) {
  const originals = all.filter((o) => o.summary_id === m.id).sort((a, b) => position(a) - position(b) || a.id - b.id);
  const count = coveredCount(m, all);
  const details = el("details", { class: "summary", "data-id": String(m.id) },
    el("summary", { text: `Earlier messages summarised (${count} message${count === 1 ? "" : "s"}) — show originals` }),
    el("div", { class: "summary-text" }, el("strong", { text: "Summary: " }), m.content),
    el("div", { class: "originals" }, ...originals.map((o) => renderOne(o, all))));
  return details;
}

// ---------------------------------------------------------------------------- sending (SSE over fetch)

async function send(content) {
  if (state.sending) return;
  state.sending = true;
  $("send").disabled = true;
  try {
    if (!state.current) {
      const conv = await api("/api/conversations", { method: "POST", body: JSON.stringify({}) });
      state.current = conv.id;
      location.hash = `c=${conv.id}`;
      $("messages").replaceChildren();
    }
    const response = await fetch(`/api/conversations/${state.current}/messages`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ content }),
    });
    if (!response.ok) {
      let message = `${response.status}`;
      try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    $("input").value = "";
    autoGrow();
    await readEvents(response);
  } catch (err) {
    showBanner(`Message not sent: ${err.message}`, "error");
  } finally {
    state.sending = false;
    $("send").disabled = false;
    if (state.current) {
      try { renderMessages((await api(`/api/conversations/${state.current}`)).messages); } catch (_) { /* banner shown */ }
    }
    await loadConversations();
  }
}

async function readEvents(response) {
  const box = $("messages");
  box.querySelector(".empty")?.remove();
  let live = null;
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      const payload = data ? JSON.parse(data) : {};
      if (event === "user") {
        box.append(renderOne(payload.message, []));
      } else if (event === "summary") {
        box.append(el("p", { class: "note", text: "Earlier messages were summarised to fit the model's context." }));
      } else if (event === "token") {
        if (!live) {
          live = el("article", { class: "message assistant streaming", "data-status": "streaming" }, el("div", { class: "text" }));
          box.append(live);
        }
        live.firstChild.textContent += payload.text;
      } else if (event === "done" && payload.message) {
        const final = renderOne(payload.message, []);
        if (live) live.replaceWith(final); else box.append(final);
        live = null;
      }
      box.scrollTop = box.scrollHeight;
    }
  }
}

// ---------------------------------------------------------------------------- wiring

function autoGrow() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 200) + "px";
}

document.addEventListener("DOMContentLoaded", async () => {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const content = $("input").value;
    if (content.trim()) send(content);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("input").addEventListener("input", autoGrow);
  $("new-conversation").addEventListener("click", () => {
    state.current = null;
    location.hash = "";
    renderMessages([]);
    document.body.classList.remove("nav-open");
    loadConversations();
    $("input").focus();
  });
  $("menu").addEventListener("click", () => {
    const open = document.body.classList.toggle("nav-open");
    $("menu").setAttribute("aria-expanded", String(open));
  });
  refreshStatus();
  setInterval(refreshStatus, 10000);
  const match = location.hash.match(/c=([0-9a-f]{32})/);
  try {
    if (match) await selectConversation(match[1]);
    else await loadConversations();
  } catch (err) {
    showBanner(`Could not load conversations: ${err.message}`, "error");
  }
});
