// clawbot chat UI: plain JS, no build step. Talks to the chat node's own API (same origin).
//
// Every /api/* call needs a login session (HttpOnly cookie, set by POST /api/login); state-changing calls
// also carry the session's CSRF token as X-CSRF-Token. A 401 from any call means the session is gone (expired,
// logged out elsewhere, password changed): the page forgets what it showed and goes back to the sign-in view.
"use strict";

const $ = (id) => document.getElementById(id);
const SOURCE_LABELS = {
  model: "model",
  knowledge_base: "knowledge base",
  web_search: "web search",
  none: "not answered",
};
const STATUS_EVERY_MS = 10000;
const SAFE_METHODS = ["GET", "HEAD", "OPTIONS"];

const state = {
  current: null, conversations: [], sending: false, status: null,
  run: null,          // the reply in progress (class Run), if any
  session: null,      // {user, csrf_token, idle_expires_at, expires_at} while signed in
  epoch: 0,           // bumped at every sign-in and sign-out: late answers of an older session are dropped
  idleTimeoutS: 3600, // the server's auth.session_idle_timeout_s, as read from the session's expiry
  skewS: 0,           // server clock minus this browser's clock (from the Date header)
  lastTouch: 0,       // local ms of the last request the server saw from this session
  lastActivity: 0,    // local ms of the last keyboard, pointer or touch input
  view: "chat",
  timers: { status: null, expiry: null, retry: null },
};

/** Thrown by a request that got 401: the page is already back at the sign-in view, nothing more to show. */
class SignedOut extends Error {}

// ---------------------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role" || key === "for") node.setAttribute(key, value);
    else if (key === "text") node.textContent = value;
    else node[key] = value;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

/** fetch with the session's CSRF token on state-changing methods; a 401 ends the session in the page. */
async function request(path, options = {}) {
  const { json, allow401, retried, ...rest } = options;
  const method = (rest.method || "GET").toUpperCase();
  const headers = { Accept: "application/json", ...(rest.headers || {}) };
  if (json !== undefined) { headers["Content-Type"] = "application/json"; rest.body = JSON.stringify(json); }
  else if (rest.body !== undefined) headers["Content-Type"] = headers["Content-Type"] || "application/json";
  if (!SAFE_METHODS.includes(method) && state.session) headers["X-CSRF-Token"] = state.session.csrf_token;
  const epoch = state.epoch;
  const response = await fetch(path, { ...rest, method, headers, credentials: "same-origin" });
  if (epoch !== state.epoch) throw new SignedOut("signed out meanwhile");
  if (response.status === 401 && !allow401) {
    sessionLost();
    throw new SignedOut("not signed in");
  }
  if (response.status !== 401 && state.session) touched();
  if (response.status === 403 && !SAFE_METHODS.includes(method) && state.session && !retried
      && /CSRF/.test(await response.clone().text())) {
    // signed in again in another tab: this tab's CSRF token is stale; take the session's current one, once
    if (await refreshSession()) return request(path, { ...options, retried: true });
  }
  return response;
}

/** Re-read GET /api/session; true if it is still this user's (its CSRF token adopted). */
async function refreshSession() {
  const response = await request("/api/session");
  if (!response.ok) return false;
  const body = await response.json();
  if (!state.session || body.user.id !== state.session.user.id) {  // another account now: start over for it
    startApp(body, response, false);
    throw new SignedOut("another account signed in");
  }
  state.session = { ...state.session, ...body };
  return true;
}

// The server's idle clock restarts at every request of the session, from any tab of this browser: the tabs
// share the time of the last one (localStorage), so that an idle tab never keeps the session alive by checking it.
const TOUCH_KEY = "clawbot.lastTouch";

function touched() {
  state.lastTouch = Date.now();
  try { localStorage.setItem(TOUCH_KEY, String(state.lastTouch)); } catch (_) { /* storage off: this tab only */ }
}

function lastTouch() {
  let shared = 0;
  try { shared = Number(localStorage.getItem(TOUCH_KEY)) || 0; } catch (_) { /* storage off */ }
  return Math.max(state.lastTouch, shared);
}

async function apiError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const error = typeof body.error === "string" ? body.error : body.error && body.error.message;
    if (error) message = error;
  } catch (_) { /* not JSON */ }
  const err = new Error(message);
  err.status = response.status;
  err.retryAfter = Number(response.headers.get("Retry-After")) || null;
  return err;
}

async function api(path, options = {}) {
  const response = await request(path, options);
  if (!response.ok) throw await apiError(response);
  return response.status === 204 ? null : response.json();
}

function when(seconds) {
  const date = new Date(seconds * 1000);
  const today = new Date();
  return date.toDateString() === today.toDateString()
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric" });
}

function stamp(seconds) {
  if (seconds == null) return "never";
  return new Date(seconds * 1000).toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
}

function number(n) { return Number(n || 0).toLocaleString(); }

function duration(seconds) {
  const s = Math.max(1, Math.ceil(seconds));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.ceil(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${Math.ceil((s % 3600) / 60)} min`;
}

function showBanner(text, kind = "warn") {
  const banner = $("banner");
  if (!text) { banner.hidden = true; return; }
  banner.textContent = text;
  banner.dataset.kind = kind;
  banner.hidden = false;
}

function say(id, text, kind = "ok") {
  const node = $(id);
  node.textContent = text || "";
  node.dataset.kind = kind;
}

function ignoreSignedOut(handler) {
  return (err) => { if (!(err instanceof SignedOut)) handler(err); };
}

// ---------------------------------------------------------------------------- sign-in, session, sign-out

async function loadAuthConfig() {
  try {
    const config = await api("/api/auth/config", { allow401: true });
    const oidc = config.oidc || {};
    $("sso").hidden = !oidc.enabled;
    if (oidc.login_url) $("sso-login").href = oidc.login_url;
  } catch (_) {
    $("sso").hidden = true;
  }
}

function showLogin(notice, kind = "info") {
  document.body.classList.add("signed-out");
  document.body.classList.remove("signed-in", "nav-open");
  $("app").hidden = true;
  $("status").hidden = true;
  $("menu").hidden = true;
  $("login-view").hidden = false;
  const box = $("login-notice");
  box.textContent = notice || "";
  box.dataset.kind = kind;
  box.hidden = !notice;
  $("login-error").hidden = true;
  $("login-submit").disabled = false;
  ($("login-username").value ? $("login-password") : $("login-username")).focus();
}

function serverNow(response) {
  const date = Date.parse(response.headers.get("Date") || "");
  return Number.isFinite(date) ? date / 1000 : Date.now() / 1000;
}

/** Take a session from POST /api/login (`fresh`: its idle clock starts now) or GET /api/session. */
function adoptSession(body, response, fresh) {
  const now = serverNow(response);  // whole seconds, never later than the server's clock
  state.skewS = now - Date.now() / 1000;
  if (body.idle_expires_at) {
    // GET /api/session may report a last-seen time up to min(30 s, timeout/10) old: round the timeout up, since
    // checking too early would itself be a request that keeps an idle session alive
    const left = body.idle_expires_at - now;
    const timeout = fresh ? left : (left < 270 ? left / 0.9 : left + 30);
    state.idleTimeoutS = Math.max(10, Math.ceil(timeout), fresh ? 0 : state.session ? state.idleTimeoutS : 0);
  }
  state.session = body;
  touched();
  scheduleExpiryCheck();
}

async function submitLogin(event) {
  event.preventDefault();
  const username = $("login-username").value.trim();
  const password = $("login-password").value;
  clearTimeout(state.timers.retry);
  $("login-retry").hidden = true;
  if (!username || !password) { loginError("Enter your user name and password."); return; }
  $("login-submit").disabled = true;
  let response;
  try {
    response = await fetch("/api/login", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ username, password }),
    });
  } catch (err) {
    loginError(`The chat node cannot be reached: ${err.message}`);
    $("login-submit").disabled = false;
    return;
  }
  $("login-submit").disabled = false;
  if (response.ok) {
    const body = await response.json();
    $("login-password").value = "";
    $("login-error").hidden = true;
    startApp(body, response, true);
    return;
  }
  const err = await apiError(response);
  $("login-password").value = "";
  loginError(err.message);
  if (response.status === 429 && err.retryAfter) retryCountdown(err.retryAfter);
  $("login-password").focus();
}

function loginError(text) {
  const box = $("login-error");
  box.textContent = text;
  box.hidden = false;
}

function retryCountdown(seconds) {
  const until = Date.now() + seconds * 1000;
  const box = $("login-retry");
  const tick = () => {
    const left = (until - Date.now()) / 1000;
      if (left <= 0) { box.textContent = "You can sign in again now."; return; }
    box.textContent = `Retry-After: ${Math.ceil(left)} s left.`;
    state.timers.retry = setTimeout(tick, 1000);
  };
  box.hidden = false;
  tick();
}

/** After a sign-in (or a session found at load): show the app for this user. */
function startApp(session, response, fresh) {
  state.epoch += 1;
  state.session = null;
  adoptSession(session, response, fresh);
  const user = session.user;
  document.body.classList.remove("signed-out");
  document.body.classList.add("signed-in");
  $("login-view").hidden = true;
  $("login-notice").hidden = true;
  $("app").hidden = false;
  $("status").hidden = false;
  $("menu").hidden = false;
  $("who-name").textContent = user.name;
  $("who-role").textContent = user.role;
  $("open-admin").hidden = user.role !== "admin";
  $("password-section").hidden = user.password === false;  // an SSO-only account has no password here
  state.lastActivity = Date.now();
  refreshStatus();
  clearInterval(state.timers.status);
  state.timers.status = setInterval(pollStatus, STATUS_EVERY_MS);
  loadUsage();
  route(true);
}

/** Forget everything shown for the last session; back to the sign-in view. */
function signOutLocally(notice, kind) {
  state.epoch += 1;
  state.session = null;
  state.current = null;
  state.conversations = [];
  state.sending = false;
  if (state.run) { state.run.controller.abort(); state.run = null; }
  setRunning(null);
  $("messages").removeAttribute("aria-busy");
  replyStatus("");
  clearInterval(state.timers.status);
  clearTimeout(state.timers.expiry);
  $("conversations").replaceChildren();
  renderMessages([]);
  $("input").value = "";
  $("keys").replaceChildren();
  $("new-key").hidden = true;
  $("new-key-value").textContent = "";
  $("users").replaceChildren();
  $("usage").replaceChildren();
  $("usage-line").textContent = "";
  for (const id of ["keys-message", "password-message", "admin-message"]) say(id, "");
  for (const form of document.querySelectorAll("#app form")) form.reset();
  showBanner(null);
  showView("chat", false);
  showLogin(notice, kind);
}

function sessionLost() {
  if (state.session) signOutLocally("Your session expired: sign in again.", "warn");
  else if ($("login-view").hidden) showLogin();
}

async function logout() {
  try {
    await api("/api/logout", { method: "POST" });
  } catch (err) {
    if (err instanceof SignedOut) return;
    showBanner(`Could not log out: ${err.message}`, "error");
    return;
  }
  history.replaceState(null, "", location.pathname);
  $("login-username").value = "";
  try { localStorage.setItem(SIGNED_OUT_KEY, String(Date.now())); } catch (_) { /* this tab only */ }
  signOutLocally("You are signed out.");
}

// a logout in one tab clears the others at once (they would get 401 at their next request anyway)
const SIGNED_OUT_KEY = "clawbot.signedOut";
window.addEventListener("storage", (event) => {
  if (event.key === SIGNED_OUT_KEY && state.session) signOutLocally("You signed out in another tab.");
});

/** The server ends an idle session after auth.session_idle_timeout_s; notice it when it happens. */
function scheduleExpiryCheck() {
  clearTimeout(state.timers.expiry);
  if (!state.session) return;
  const idleDeadline = lastTouch() + state.idleTimeoutS * 1000;
  const hardDeadline = state.session.expires_at ? (state.session.expires_at - state.skewS) * 1000 : Infinity;
  const wait = Math.min(idleDeadline, hardDeadline) - Date.now() + 1000;
  state.timers.expiry = setTimeout(checkExpiry, Math.max(1000, Math.min(wait, 2 ** 31 - 1)));
}

async function checkExpiry() {
  if (!state.session) return;
  const idleDeadline = lastTouch() + state.idleTimeoutS * 1000;
  const hardDeadline = state.session.expires_at ? (state.session.expires_at - state.skewS) * 1000 : Infinity;
  if (Date.now() < Math.min(idleDeadline, hardDeadline)) { scheduleExpiryCheck(); return; }
  try {
    const response = await request("/api/session");
    if (response.ok) adoptSession(await response.json(), response, false);
    else scheduleExpiryCheck();
  } catch (err) {
    if (!(err instanceof SignedOut)) scheduleExpiryCheck();
  }
}

// ---------------------------------------------------------------------------- views and routing

function showView(name, updateHash = true) {
  state.view = name;
  $("chat-view").hidden = name !== "chat";
  $("account-view").hidden = name !== "account";
  $("admin-view").hidden = name !== "admin";
  document.body.classList.remove("nav-open");
  $("menu").setAttribute("aria-expanded", "false");
  if (updateHash) {
    const hash = name === "chat" ? (state.current ? `c=${state.current}` : "") : name;
    if (location.hash.slice(1) !== hash) {
      if (hash) location.hash = hash;
      else history.pushState(null, "", location.pathname);
    }
  }
}

function conversationInHash() {
  const match = location.hash.slice(1).match(/^(?:c=)?([0-9a-f]{32})$/);
  return match ? match[1] : null;
}

/** Show what the address names: #c=<id> (or #<id>), #account, #admin, or a new conversation. */
function route(fresh = false) {
  if (!state.session) return;
  const hash = location.hash.slice(1);
  const id = conversationInHash();
  if (fresh && !id) loadConversations().catch(ignoreSignedOut((err) => showBanner(`Could not load conversations: ${err.message}`, "error")));
  if (hash === "account") { showView("account", false); loadAccount(); return; }
  if (hash === "admin") {
    if (state.session.user.role === "admin") { showView("admin", false); loadAdmin(); return; }
    history.replaceState(null, "", location.pathname);
  }
  showView("chat", false);
  if (id) {
    if (id !== state.current || fresh) selectConversation(id);
  } else if (state.current) {
    state.current = null;
    renderMessages([]);
    loadConversations().catch(ignoreSignedOut(() => {}));
  }
}

// ---------------------------------------------------------------------------- status strip

async function refreshStatus() {
  if (!state.session) return;
  let status;
  try {
    status = await api("/api/status");
  } catch (err) {
    if (err instanceof SignedOut) return;
    setNode("status-chat", "down", "Chat node", "the chat node does not answer: " + err.message);
    setNode("status-model", "unknown", "Model", "unknown while the chat node is down");
    showBanner("The chat node cannot be reached. Check that the clawbot chat agent is running; this page retries every 10 s.", "error");
    return;
  }
  state.status = status;
  setNode("status-chat", status.chat.state === "ok" ? "up" : "degraded", "Chat node",
    status.chat.state === "ok" ? "database ok" : status.chat.database);
  const gw = status.gateway;
  setModelChip(gw, status.queue);
  if (gw.ready) {
    showBanner(null);
  } else {
    const fallbacks = (status.fallback_strategies || []).map((s) => SOURCE_LABELS[s] || s);
    const then = fallbacks.length
      ? ` Questions are answered from ${fallbacks.join(", then ")} until it is back.`
      : " Questions cannot be answered until it is back.";
    const problems = (status.fallback_problems || []).length ? ` Fallback problems: ${status.fallback_problems.join("; ")}.` : "";
    showBanner(`The model node is unavailable: ${gw.error || "not ready"}.${then}${problems}`, "warn");
  }
  const empty = $("messages").querySelector(".empty");
  const card = gw.model_card;
  if (empty && card && card.base_model && card.note && !empty.querySelector(".model-note")) empty.replaceWith(emptyState());
}

/** The model chip: the model's name (a base model says so, its note as tooltip and description), its state. */
function setModelChip(gw, queue) {
  const card = gw.model_card && gw.model_card.name ? gw.model_card : null;
  const nodeState = gw.ready ? "up" : gw.reachable ? "degraded" : "down";
  const detail = [gw.ready ? `${gw.endpoint}: ready` : gw.error || "not ready"];
  if (queue && queue.capacity != null) {
    detail.push(`${queue.active || 0} of ${queue.capacity} answering, ${queue.waiting || 0} waiting`);
  }
  if (card && card.note) detail.unshift(card.note);
  setNode("status-model", nodeState, "Model", detail.join(" · "));
  const chip = $("status-model");
  if (card) {
    const name = `${card.name}${card.base_model ? " · base model" : ""}`;
    chip.lastChild.textContent = gw.ready ? name : `${name}: ${nodeState === "down" ? "down" : "not ready"}`;
    chip.dataset.baseModel = String(Boolean(card.base_model));
  } else {
    delete chip.dataset.baseModel;
  }
  $("model-note").textContent = card && card.note ? card.note : "";
}

/** How long without input the page stops asking for the status: its requests must not keep an idle session alive. */
function activeWindowMs() { return Math.min(60, state.idleTimeoutS / 2) * 1000; }

function pollStatus() {
  if (document.hidden || Date.now() - state.lastActivity > activeWindowMs()) return;
  refreshStatus();
}

function noteActivity() {
  const now = Date.now();
  const wasIdle = now - state.lastActivity > activeWindowMs();
  state.lastActivity = now;
  if (wasIdle && state.session) refreshStatus();  // back after a pause: the strip is stale (or the session gone)
}

function setNode(id, nodeState, label, detail) {
  const node = $(id);
  node.dataset.state = nodeState;
  node.title = detail || "";
  node.lastChild.textContent = `${label}: ${{ up: "ok", down: "down", degraded: "not ready", unknown: "…" }[nodeState]}`;
}

// ---------------------------------------------------------------------------- usage

function usageLine(usage) {
  const { today, limits } = usage;
  const tokens = limits.tokens_per_day
    ? `${number(today.tokens)} of ${number(limits.tokens_per_day)} tokens today`
    : `${number(today.tokens)} tokens today (no daily limit)`;
  const rpm = limits.requests_per_minute ? `limit ${number(limits.requests_per_minute)} requests/min` : "no requests/min limit";
  return `${tokens} · ${rpm}`;
}

async function loadUsage() {
  try {
    const usage = await api("/api/usage");
    $("usage-line").textContent = usageLine(usage);
    renderUsage(usage);
    return usage;
  } catch (err) {
    if (!(err instanceof SignedOut)) $("usage-line").textContent = `usage unavailable: ${err.message}`;
    return null;
  }
}

function renderUsage(usage) {
  const { today, limits, minute } = usage;
  const box = $("usage");
  const rows = el("dl", { class: "facts" },
    el("dt", { text: "Tokens today" }),
    el("dd", { "data-field": "tokens", text: limits.tokens_per_day
      ? `${number(today.tokens)} of ${number(limits.tokens_per_day)} (prompt ${number(today.prompt_tokens)}, reply ${number(today.completion_tokens)})`
      : `${number(today.tokens)} (prompt ${number(today.prompt_tokens)}, reply ${number(today.completion_tokens)}); no daily limit` }),
    el("dt", { text: "Requests today" }),
    el("dd", { "data-field": "requests", text: number(today.requests) }),
    el("dt", { text: "Requests in the last minute" }),
    el("dd", { "data-field": "minute", text: limits.requests_per_minute
      ? `${number(minute.requests)} of ${number(limits.requests_per_minute)} allowed per minute`
      : `${number(minute.requests)} (no per-minute limit)` }));
  box.replaceChildren(rows);
  if (limits.tokens_per_day) {
    const bar = el("progress", { max: limits.tokens_per_day, value: Math.min(today.tokens, limits.tokens_per_day) });
    bar.setAttribute("aria-label", "Share of today's tokens used");
    box.append(bar);
  }
  box.append(el("p", { class: "hint", text: "Days are counted in UTC; the web UI and your API keys share these limits." }));
}

// ---------------------------------------------------------------------------- account: keys and password

async function loadAccount() {
  loadUsage();
  try {
    renderKeys(await api("/api/keys"));
  } catch (err) {
    if (!(err instanceof SignedOut)) say("keys-message", `Could not list your keys: ${err.message}`, "error");
  }
}

function renderKeys(keys) {
  const body = $("keys");
  body.replaceChildren();
  if (!keys.length) {
    body.append(el("tr", {}, el("td", { colSpan: 5, class: "muted", text: "No API keys yet." })));
    return;
  }
  for (const key of keys) {
    const revoke = el("button", { class: "danger small", type: "button", text: "Revoke" });
    revoke.setAttribute("aria-label", `Revoke key ${key.name} (${key.prefix})`);
    revoke.addEventListener("click", () => revokeKey(key));
    body.append(el("tr", { "data-key-id": String(key.id) },
      el("td", { text: key.name }),
      el("td", {}, el("code", { text: `${key.prefix}_…` })),
      el("td", { text: stamp(key.created_at) }),
      el("td", { text: stamp(key.last_used_at) }),
      el("td", {}, revoke)));
  }
}

async function createKey(event) {
  event.preventDefault();
  const name = $("key-name").value.trim();
  try {
    const key = await api("/api/keys", { method: "POST", json: { name } });
    $("key-name").value = "";
    $("new-key-value").textContent = key.key;
    $("copy-result").textContent = "";
    $("new-key").hidden = false;
    say("keys-message", `Key “${key.name}” created.`);
    renderKeys(await api("/api/keys"));
    $("copy-key").focus();
  } catch (err) {
    if (!(err instanceof SignedOut)) say("keys-message", `Could not create the key: ${err.message}`, "error");
  }
}

async function copyKey() {
  const value = $("new-key-value").textContent;
  try {
    await navigator.clipboard.writeText(value);
    $("copy-result").textContent = "Copied to the clipboard.";
  } catch (_) {
    const range = document.createRange();
    range.selectNodeContents($("new-key-value"));
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    $("copy-result").textContent = "The browser did not allow copying: the key is selected, copy it with Ctrl+C.";
  }
}

async function revokeKey(key) {
  if (!confirm(`Revoke the key “${key.name}” (${key.prefix})? Apps using it stop working at once.`)) return;
  try {
    await api(`/api/keys/${key.id}`, { method: "DELETE" });
    say("keys-message", `Key “${key.name}” revoked.`);
    renderKeys(await api("/api/keys"));
  } catch (err) {
    if (!(err instanceof SignedOut)) say("keys-message", `Could not revoke the key: ${err.message}`, "error");
  }
}

async function changePassword(event) {
  event.preventDefault();
  const current = $("current-password").value, next = $("new-password").value;
  if (next.length < 8) { say("password-message", "The new password needs at least 8 characters.", "error"); return; }
  if (next !== $("repeat-password").value) { say("password-message", "The two new passwords differ.", "error"); return; }
  try {
    await api("/api/password", { method: "POST", json: { current_password: current, new_password: next } });
  } catch (err) {
    if (!(err instanceof SignedOut)) say("password-message", `Password not changed: ${err.message}`, "error");
    return;
  }
  $("password-form").reset();
  // the server may end every session of the account when its password changes
  const check = await request("/api/session", { allow401: true }).catch(() => null);
  if (check && check.status === 401) signOutLocally("Your password was changed: sign in with the new one.");
  else say("password-message", "Password changed.");
}

// ---------------------------------------------------------------------------- admin: users

async function loadAdmin() {
  try {
    const [users, usage] = await Promise.all([api("/api/admin/users"), api("/api/admin/usage")]);
    renderUsers(users, usage);
  } catch (err) {
    if (!(err instanceof SignedOut)) say("admin-message", `Could not list the users: ${err.message}`, "error");
  }
}

function renderUsers(users, usage) {
  const byName = Object.fromEntries(usage.map((u) => [u.user, u]));
  const focused = document.activeElement && document.activeElement.closest("#users [data-user]")
    ? [document.activeElement.closest("[data-user]").dataset.user, document.activeElement.dataset.action] : null;
  const list = $("users");
  list.replaceChildren();
  users.forEach((user, i) => list.append(userCard(user, byName[user.name], `u${i}`)));
  if (focused) {
    const again = list.querySelector(`[data-user="${CSS.escape(focused[0])}"] [data-action="${CSS.escape(focused[1] || "")}"]`);
    if (again) again.focus();
  }
}

function userCard(user, usage, uid) {
  const me = state.session && user.name === state.session.user.name;
  const labels = el("span", { class: "labels" },
    el("span", { class: `label role-${user.role}`, text: user.role }),
    user.disabled ? el("span", { class: "label warn", text: "disabled" }) : null,
    user.sso ? el("span", { class: "label", text: "SSO" }) : null,
    me ? el("span", { class: "label", text: "you" }) : null);
  const head = el("div", { class: "user-head" }, el("h3", { text: user.name }), labels);
  const override = user.limits_override || {};
  const limitText = (name, unit) => {
    const value = user.limits[name];
    const text = value ? `${number(value)} ${unit}` : `no ${unit} limit`;
    return override[name] != null ? `${text} (override)` : text;
  };
  const facts = el("dl", { class: "facts" },
    el("dt", { text: "Last login" }), el("dd", { "data-field": "last-login", text: stamp(user.last_login_at) }),
    el("dt", { text: "Limits" }), el("dd", { "data-field": "limits",
      text: `${limitText("requests_per_minute", "requests/min")}, ${limitText("tokens_per_day", "tokens/day")}` }),
    el("dt", { text: "Today" }), el("dd", { "data-field": "usage", text: usage
      ? `${number(usage.today.tokens)} tokens, ${number(usage.today.requests)} requests (${number(usage.minute.requests)} in the last minute)`
      : "no usage" }));

  // role and enabled/disabled
  const role = el("select", { id: `${uid}-role`, "data-action": "role", disabled: me },
    el("option", { value: "user", text: "user" }), el("option", { value: "admin", text: "admin" }));
  role.value = user.role;
  role.addEventListener("change", () => changeUser(user, { role: role.value }, `role set to ${role.value}`));
  const toggle = el("button", { class: "secondary small", type: "button", "data-action": "disable", disabled: me,
    text: user.disabled ? "Enable" : "Disable" });
  toggle.setAttribute("aria-label", `${user.disabled ? "Enable" : "Disable"} ${user.name}`);
  toggle.addEventListener("click", () => changeUser(user, { disabled: !user.disabled }, user.disabled ? "enabled" : "disabled"));
  const remove = el("button", { class: "danger small", type: "button", "data-action": "remove", disabled: me, text: "Remove" });
  remove.setAttribute("aria-label", `Remove ${user.name}`);
  remove.addEventListener("click", () => removeUser(user));
  const controls = el("div", { class: "user-controls" },
    el("label", { for: `${uid}-role`, text: "Role" }), role, toggle, remove);

  // password reset
  const password = el("input", { id: `${uid}-password`, type: "password", autocomplete: "new-password", minLength: 8, required: true });
  const reset = el("form", { class: "inline-form", "data-action": "password-form" },
    el("label", { for: `${uid}-password`, text: `New password for ${user.name}` }), password,
    el("button", { class: "secondary small", type: "submit", "data-action": "password", text: "Reset password" }));
  reset.addEventListener("submit", (e) => {
    e.preventDefault();
    if (password.value.length < 8) { say("admin-message", "A password needs at least 8 characters.", "error"); return; }
    changeUser(user, { password: password.value }, "password reset (their sessions ended)");
  });

  // limit overrides
  const rpm = el("input", { id: `${uid}-rpm`, type: "number", min: 0, step: 1, inputMode: "numeric",
    value: override.requests_per_minute ?? "", placeholder: "default" });
  const tpd = el("input", { id: `${uid}-tpd`, type: "number", min: 0, step: 1, inputMode: "numeric",
    value: override.tokens_per_day ?? "", placeholder: "default" });
  const limits = el("form", { class: "inline-form limits-form" },
    el("label", { for: `${uid}-rpm`, text: "Requests per minute" }), rpm,
    el("label", { for: `${uid}-tpd`, text: "Tokens per day" }), tpd,
    el("button", { class: "secondary small", type: "submit", "data-action": "limits", text: "Save limits" }));
  const clear = el("button", { class: "secondary small", type: "button", "data-action": "clear-limits",
    disabled: !user.limits_override, text: "Clear override" });
  clear.setAttribute("aria-label", `Clear the limit override of ${user.name}`);
  clear.addEventListener("click", () => changeUser(user, { limits: null }, "limit override cleared"));
  limits.append(clear);
  limits.addEventListener("submit", (e) => {
    e.preventDefault();
    const value = (input) => (input.value.trim() === "" ? null : Number(input.value));
    const body = { requests_per_minute: value(rpm), tokens_per_day: value(tpd) };
    for (const v of Object.values(body)) {
      if (v != null && (!Number.isInteger(v) || v < 0)) { say("admin-message", "A limit is a whole number ≥ 0 (0: unlimited), or empty for the default.", "error"); return; }
    }
    changeUser(user, { limits: body }, "limits saved");
  });
  const limitsHint = el("p", { class: "hint", text: "Empty: the node's default (auth.limits). 0: unlimited." });

  return el("li", { class: "card user-card", "data-user": user.name, "data-disabled": String(user.disabled) },
    head, facts, controls, reset, limits, limitsHint);
}

async function changeUser(user, change, done) {
  try {
    await api(`/api/admin/users/${encodeURIComponent(user.name)}`, { method: "PATCH", json: change });
    say("admin-message", `${user.name}: ${done}.`);
  } catch (err) {
    if (err instanceof SignedOut) return;
    say("admin-message", `${user.name}: ${err.message}`, "error");
  }
  await loadAdmin();
}

async function removeUser(user) {
  if (!confirm(`Remove ${user.name} with their conversations, keys and usage? This cannot be undone.`)) return;
  try {
    await api(`/api/admin/users/${encodeURIComponent(user.name)}`, { method: "DELETE" });
    say("admin-message", `${user.name}: removed.`);
  } catch (err) {
    if (err instanceof SignedOut) return;
    say("admin-message", `${user.name}: ${err.message}`, "error");
  }
  await loadAdmin();
}

async function addUser(event) {
  event.preventDefault();
  const name = $("new-user-name").value.trim(), password = $("new-user-password").value, role = $("new-user-role").value;
  if (!name) { say("admin-message", "Give the new user a name.", "error"); return; }
  if (password.length < 8) { say("admin-message", "A password needs at least 8 characters.", "error"); return; }
  try {
    await api("/api/admin/users", { method: "POST", json: { name, password, role } });
    $("add-user-form").reset();
    say("admin-message", `${name}: added (role ${role}).`);
  } catch (err) {
    if (err instanceof SignedOut) return;
    say("admin-message", `Could not add ${name}: ${err.message}`, "error");
  }
  await loadAdmin();
}

// ---------------------------------------------------------------------------- conversation list

async function loadConversations() {
  if (!state.session) return;
  const conversations = await api("/api/conversations");
  state.conversations = conversations;
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
    list.append(el("li", { class: conv.id === state.current ? "active" : "", "data-id": conv.id }, open, remove));
  }
}

async function deleteConversation(conv) {
  if (!confirm(`Delete “${conv.title}”? This cannot be undone.`)) return;
  try {
    await api(`/api/conversations/${conv.id}`, { method: "DELETE" });
    if (state.current === conv.id) { state.current = null; history.pushState(null, "", location.pathname); renderMessages([]); }
    await loadConversations();
  } catch (err) {
    if (!(err instanceof SignedOut)) showBanner(`Could not delete the conversation: ${err.message}`, "error");
  }
}

async function selectConversation(id) {
  state.current = id;
  showView("chat", false);
  if (location.hash.slice(1) !== `c=${id}`) location.hash = `c=${id}`;
  try {
    const conv = await api(`/api/conversations/${id}`);
    if (state.current === id) renderMessages(conv.messages);
  } catch (err) {
    if (err instanceof SignedOut) return;
    if (state.current === id) {
      state.current = null;
      history.replaceState(null, "", location.pathname);
      renderMessages([]);
    }
    showBanner(`Could not open the conversation: ${err.message}`, "error");
  }
  await loadConversations().catch(ignoreSignedOut(() => {}));
}

// ---------------------------------------------------------------------------- Markdown (replies only)

// A reply is Markdown: marked renders it, DOMPurify keeps only these tags and attributes. Raw HTML in a reply is
// escaped to text before that (a model's or a document's "<script>" is shown, never run); images become links
// (no request leaves the page because a reply says so). Both libraries are vendored (static/vendor/README.md).
const MD_TAGS = ["a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li", "ol", "p",
  "pre", "s", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul"];
const MD_ATTRS = ["href", "title", "align", "start", "class"];
let markdown = null;

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function markdownEngine() {
  if (markdown !== null) return markdown;
  if (!window.marked || !window.DOMPurify || !DOMPurify.isSupported) { markdown = false; return markdown; }
  const engine = new window.marked.Marked({ gfm: true, breaks: true, async: false });
  engine.use({ renderer: {
    html(token) { return token.block ? `<p>${escapeHtml(token.text.trim())}</p>\n` : escapeHtml(token.text); },
    image(token) { return `<a href="${escapeHtml(token.href)}">${escapeHtml(`image: ${token.text || token.href}`)}</a>`; },
  } });
  DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
    // marked marks a fenced block's language as class="language-x"; no other class may come from a reply
    if (data.attrName === "class" && !(node.nodeName === "CODE" && /^language-[\w+#.-]{1,40}$/.test(data.attrValue))) data.keepAttr = false;
  });
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.nodeName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    } else if (node.nodeName === "A") {
      node.setAttribute("title", "link removed: not a web address");  // e.g. javascript:
    }
  });
  markdown = { engine };
  return markdown;
}

/** Fill `bubble` with `text` rendered as sanitised Markdown (plain text if the libraries did not load). */
function renderMarkdown(bubble, text) {
  const md = markdownEngine();
  if (!md) { bubble.textContent = text; bubble.classList.add("plain"); return; }
  const html = md.engine.parse(text || "");
  const clean = DOMPurify.sanitize(html, { ALLOWED_TAGS: MD_TAGS, ALLOWED_ATTR: MD_ATTRS, ALLOW_DATA_ATTR: false,
    ALLOW_ARIA_ATTR: false, RETURN_DOM_FRAGMENT: true });
  for (const pre of clean.querySelectorAll("pre")) {
    const block = codeBlock(pre);
    pre.replaceWith(block);
    block.append(pre);
  }
  bubble.replaceChildren(clean);
}

let codeBlocks = 0;

function codeBlock(pre) {
  const code = pre.querySelector("code");
  const lang = code && (code.className.match(/language-([\w+#.-]+)/) || [])[1];
  codeBlocks += 1;
  pre.id = `code-${codeBlocks}`;
  pre.tabIndex = 0;  // a wide block scrolls sideways: reachable by keyboard
  pre.setAttribute("aria-label", lang ? `Code (${lang})` : "Code");
  // its name is "Copy sh code" (the visible word first, as speech input users say it), then "Copied sh code"
  const label = el("span", { class: "copy-label", text: "Copy" });
  const copy = el("button", { class: "copy-code small secondary", type: "button" },
    label, el("span", { class: "visually-hidden", text: lang ? ` ${lang} code` : " code" }));
  copy.setAttribute("aria-controls", pre.id);
  // without the block's last newline: pasted into a terminal, the last command is not run at once
  copy.addEventListener("click", () => copyText(pre.textContent.replace(/\n$/, ""), label, pre));
  return el("div", { class: "codeblock" },
    el("div", { class: "codeblock-head" }, el("span", { class: "lang", text: lang || "code" }), copy));
}

async function copyText(text, label, source) {
  try {
    await navigator.clipboard.writeText(text);
    label.textContent = "Copied";
    replyStatus("Code copied to the clipboard.");
  } catch (_) {  // clipboard refused: select the text so that Ctrl+C copies it
    const range = document.createRange();
    range.selectNodeContents(source);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    label.textContent = "Selected";
    replyStatus("The browser did not allow copying: the code is selected, copy it with Ctrl+C.");
  }
  setTimeout(() => { label.textContent = "Copy"; }, 2000);
}

// ---------------------------------------------------------------------------- messages

const FINISH_LABELS = { stop: "complete", length: "cut at max_tokens", stopped: "stopped by you" };

function position(m) { return m.role === "summary" ? m.covers_from : m.id; }

function renderMessages(messages) {
  const box = $("messages");
  box.replaceChildren();
  const top = messages.filter((m) => m.summary_id == null).sort((a, b) => position(a) - position(b) || a.id - b.id);
  for (const m of top) box.append(renderOne(m, messages));
  if (!top.length) box.append(emptyState());
  offerRegenerate();
  box.scrollTop = box.scrollHeight;
}

function emptyState() {
  const card = state.status && state.status.gateway && state.status.gateway.model_card;
  return el("div", { class: "empty" },
    el("p", { text: "Start a conversation: type a question below." }),
    card && card.base_model && card.note ? el("p", { class: "model-note", text: card.note }) : null);
}

function renderOne(m, all) {
  if (m.role === "summary") return renderSummary(m, all);
  const bubble = el("div", { class: "text" });
  const article = el("article", { class: `message ${m.role}`, "data-id": String(m.id), "data-status": m.status }, bubble);
  if (m.role === "assistant") {
    renderMarkdown(bubble, m.content);
    article.dataset.source = m.source || "none";
    const finish = (m.meta || {}).finish_reason;
    if (finish) article.dataset.finish = finish;
    article.setAttribute("aria-label", `Answer (${SOURCE_LABELS[m.source] || "not answered"})`);
    article.append(footer(m), details(m));
  } else {
    bubble.textContent = m.content;  // what a person typed is shown as typed
    article.setAttribute("aria-label", "Your message");
    if (m.status === "rejected") article.append(el("div", { class: "note", text: "not sent to the model (too long)" }));
    if (m.status === "cancelled") article.append(el("div", { class: "note cancelled", text: "cancelled (not sent)" }));
  }
  return article;
}

function footer(m) {
  const foot = el("div", { class: "footer" });
  const source = m.source || "none";
  const meta = m.meta || {};
  foot.append(el("span", { class: `label source-${source}`, text: SOURCE_LABELS[source] || source }));
  if (meta.finish_reason === "stopped") foot.append(el("span", { class: "label stopped", text: "stopped" }));
  else if (meta.finish_reason === "length") foot.append(el("span", { class: "label warn", text: "cut at max_tokens" }));
  else if (m.status === "incomplete") foot.append(el("span", { class: "label warn", text: "incomplete" }));
  if (meta.model_error && source !== "model") foot.append(el("span", { class: "why", text: `model unavailable: ${meta.model_error}` }));
  if (meta.error && m.status === "incomplete") foot.append(el("span", { class: "why", text: meta.error }));
  for (const c of meta.citations || []) {
    if (c.url) {
      foot.append(el("a", { class: "cite", href: c.url, rel: "noopener noreferrer", target: "_blank", text: c.title || c.url }));
    } else {
      foot.append(el("span", { class: "cite", text: `${c.source} § ${c.heading}` }));
    }
  }
  return foot;
}

function seconds(value) { return value < 10 ? `${Number(value).toFixed(2)} s` : `${Number(value).toFixed(1)} s`; }

/** The disclosure under an answer: which model, how many tokens, how fast, why it ended, where it came from. */
function details(m) {
  const meta = m.meta || {};
  const rows = [];
  const row = (name, value, field) => { if (value != null && value !== "") rows.push([name, String(value), field]); };
  row("Model", meta.model, "model");
  row("Source", SOURCE_LABELS[m.source || "none"], "source");
  const finish = FINISH_LABELS[meta.finish_reason] || meta.finish_reason
    || { complete: "complete", incomplete: "incomplete", error: "error", rejected: "rejected" }[m.status] || m.status;
  row("Finish", finish, "finish");
  if (meta.prompt_tokens != null) {
    row("Prompt tokens", meta.budget ? `${number(meta.prompt_tokens)} (budget ${number(meta.budget)})` : number(meta.prompt_tokens), "prompt-tokens");
  }
  if (meta.completion_tokens != null) row("Completion tokens", number(meta.completion_tokens), "completion-tokens");
  if (meta.first_token_s != null) row("Time to first token", seconds(meta.first_token_s), "first-token");
  if (meta.tokens_per_s != null) row("Speed", `${Number(meta.tokens_per_s).toFixed(1)} tok/s`, "speed");
  if (meta.duration_s != null) row("Duration", seconds(meta.duration_s), "duration");
  if (meta.queue_wait_s) row("Waited in line", seconds(meta.queue_wait_s), "queue-wait");
  if (meta.model_error) row("Model error", meta.model_error, "model-error");
  if (meta.fallbacks_tried && meta.fallbacks_tried.length) row("Fallbacks tried", meta.fallbacks_tried.join("; "), "fallbacks");
  const list = el("dl", { class: "facts" });
  for (const [name, value, field] of rows) list.append(el("dt", { text: name }), el("dd", { "data-field": field, text: value }));
  const brief = [meta.completion_tokens != null ? `${number(meta.completion_tokens)} tokens` : null,
    meta.tokens_per_s != null ? `${Number(meta.tokens_per_s).toFixed(1)} tok/s` : null, finish].filter(Boolean).join(" · ");
  return el("details", { class: "answer-details" },
    el("summary", {}, "Details", el("span", { class: "brief", text: brief ? ` · ${brief}` : "" })), list);
}

/** Regenerate is offered on the conversation's last message when it is an answer (and nothing is running). */
function offerRegenerate() {
  for (const old of document.querySelectorAll("#messages .regenerate")) old.remove();
  if (state.sending) return;
  const items = [...$("messages").children].filter((n) => n.matches("article.message, details.summary"));
  const last = items[items.length - 1];
  if (!last || !last.matches("article.message.assistant")) return;
  const button = el("button", { class: "regenerate secondary small", type: "button", text: "Regenerate" });
  button.setAttribute("aria-label", "Regenerate this answer");
  button.addEventListener("click", () => startReply("regenerate"));
  last.querySelector(".footer").append(button);
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

/** A refusal shown in the conversation itself (a limit reached): it says which limit, and when to try again. */
function limitNotice(err) {
  const retry = err.retryAfter ? ` Try again in ${duration(err.retryAfter)}.` : "";
  return el("p", { class: "limit-notice", role: "alert", text: `Not sent: ${err.message}.${retry}` });
}

function replyStatus(text) { $("reply-status").textContent = text || ""; }

// ---------------------------------------------------------------------------- sending (SSE over fetch)

/** One reply in progress: a message sent (or an answer regenerated), from the request to the stream's end. */
class Run {
  constructor(kind) {
    this.kind = kind;                    // "send" | "regenerate"
    this.controller = new AbortController();
    this.conversation = null;
    this.phase = "sending";              // sending → queued → streaming (or cancelled / done)
    this.stopRequested = false;
    this.ended = false;
    this.userArticle = null;
    this.live = null;                    // the streaming answer's article
    this.raw = "";                       // its text so far
    this.queueBox = null;
    this.queue = null;                   // the last `queued` event, with the local time it came
    this.timer = null;
    this.finished = new Promise((resolve) => { this.finish = resolve; });
  }
}

function setRunning(run) {
  const busy = run != null;
  const focused = document.activeElement;
  $("send").disabled = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("stop").disabled = false;
  // the button that had the focus is hidden: its twin (or the message box) takes it, so focus is never lost
  if (busy && focused === $("send")) $("stop").focus();
  if (!busy && focused === $("stop")) $("input").focus();
  if (busy) updateStopButton(run);
  for (const b of document.querySelectorAll("#messages .regenerate")) b.disabled = busy;
}

function updateStopButton(run) {
  const queued = run.phase === "queued" || run.phase === "sending";
  $("stop").textContent = queued ? "Cancel" : "Stop";
  $("stop").setAttribute("aria-label", queued ? "Cancel the message waiting in line" : "Stop generating the answer");
}

async function send(content) { return startReply("send", content); }

async function startReply(kind, content) {
  if (state.sending || !state.session) return;
  if (kind === "regenerate" && !state.current) return;
  state.sending = true;
  const epoch = state.epoch;
  const run = new Run(kind);
  state.run = run;
  setRunning(run);
  $("messages").setAttribute("aria-busy", "true");  // until the conversation is read again at the end
  let notice = null;
  try {
    if (!state.current) {
      const conv = await api("/api/conversations", { method: "POST", json: {} });
      state.current = conv.id;
      location.hash = `c=${conv.id}`;
      $("messages").replaceChildren();
    }
    run.conversation = state.current;
    const path = `/api/conversations/${run.conversation}/${kind === "regenerate" ? "regenerate" : "messages"}`;
    const response = await request(path, {
      method: "POST",
      headers: { Accept: "text/event-stream" },
      json: kind === "regenerate" ? undefined : { content },
      signal: run.controller.signal,
    });
    if (!response.ok) throw await apiError(response);
    if (kind === "send") { $("input").value = ""; autoGrow(); }
    await readEvents(response, epoch, run);
  } catch (err) {
    if (err instanceof SignedOut) return;
    if (err.name === "AbortError") {
      if (run.live) markStopped(run);  // what the server kept is shown when the conversation is read again below
    } else if (err.status === 429) notice = limitNotice(err);
    else showBanner(`${kind === "regenerate" ? "Could not regenerate" : "Message not sent"}: ${err.message}`, "error");
  } finally {
    run.ended = true;
    clearInterval(run.timer);
    run.finish();
    if (epoch === state.epoch) {
      state.sending = false;
      state.run = null;
      setRunning(null);
    }
  }
  if (epoch !== state.epoch) return;
  try {
    if (state.current && state.current === run.conversation) renderMessages((await api(`/api/conversations/${state.current}`)).messages);
    if (notice) { $("messages").querySelector(".empty")?.remove(); $("messages").append(notice); notice.scrollIntoView({ block: "nearest" }); }
  } catch (err) {
    if (!(err instanceof SignedOut)) showBanner(`Could not reload the conversation: ${err.message}`, "error");
  } finally {
    if (epoch === state.epoch && !state.run) $("messages").removeAttribute("aria-busy");
  }
  // a focused control inside the conversation (Cancel, Stop, Regenerate) was replaced: back to the message box
  if (!document.activeElement || document.activeElement === document.body) $("input").focus();
  loadConversations().catch(ignoreSignedOut(() => {}));
  loadUsage();
}

/** Stop: ask the server to stop (or to take the message out of the line), then abort the request if the
 * server's stream has not ended by itself by then. */
async function stopReply() {
  const run = state.run;
  if (!run || run.stopRequested || run.ended) return;
  run.stopRequested = true;
  $("stop").disabled = true;
  if (run.queueBox) run.queueBox.querySelector("button").disabled = true;
  const queued = run.phase !== "streaming";
  replyStatus(queued ? "Cancelling…" : "Stopping…");
  if (run.conversation) {
    try {
      await api(`/api/conversations/${run.conversation}/stop`, { method: "POST" });
    } catch (err) {
      if (err instanceof SignedOut) return;
      // the request is aborted below all the same
    }
  }
  await Promise.race([run.finished, new Promise((resolve) => setTimeout(resolve, 2000))]);
  if (!run.ended) run.controller.abort();
}

function markStopped(run) {
  run.live.classList.remove("streaming");
  run.live.removeAttribute("aria-busy");
  run.live.dataset.status = "incomplete";
  run.live.dataset.finish = "stopped";
  renderMarkdown(run.live.querySelector(".text"), run.raw);
  replyStatus("Stopped.");
}

function nearBottom(box) { return box.scrollHeight - box.scrollTop - box.clientHeight < 60; }

function liveAnswer(run, box) {
  if (!run.live) {
    hideQueue(run);
    run.live = el("article", { class: "message assistant streaming", "data-status": "streaming", "aria-busy": "true",
      "aria-label": "Answer being written" }, el("div", { class: "text" }));
    box.append(run.live);
  }
  return run.live;
}

function renderLive(run) {
  if (run.pending) return;
  run.pending = true;
  const paint = () => {
    run.pending = false;
    if (!run.live || !run.live.isConnected) return;
    const box = $("messages");
    const stick = nearBottom(box);
    renderMarkdown(run.live.querySelector(".text"), run.raw);
    if (stick) box.scrollTop = box.scrollHeight;
  };
  if (document.hidden) setTimeout(paint, 100); else requestAnimationFrame(paint);
}

async function readEvents(response, epoch, run) {
  const box = $("messages");
  box.querySelector(".empty")?.remove();
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    if (epoch !== state.epoch) { reader.cancel(); return; }  // signed out meanwhile: show nothing more
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
      const stick = nearBottom(box);
      handleEvent(event, data ? JSON.parse(data) : {}, run, box);
      if (stick) box.scrollTop = box.scrollHeight;
    }
  }
}

function handleEvent(event, payload, run, box) {
  if (event === "user") {
    if (payload.regenerated) {
      for (const id of payload.removed || []) box.querySelector(`article.message[data-id="${id}"]`)?.remove();
      for (const b of box.querySelectorAll(".regenerate")) b.remove();
      run.userArticle = box.querySelector(`article.message[data-id="${payload.message.id}"]`);
    } else {
      run.userArticle = renderOne(payload.message, []);
      box.append(run.userArticle);
    }
    replyStatus(run.kind === "regenerate" ? "Regenerating the answer…" : "Message sent.");
  } else if (event === "queued") {
    run.phase = "queued";
    updateStopButton(run);
    showQueue(run, payload, box);
  } else if (event === "summary") {
    box.append(el("p", { class: "note", text: "Earlier messages were summarised to fit the model's context." }));
  } else if (event === "start") {
    run.phase = "streaming";
    updateStopButton(run);
    liveAnswer(run, box);
    replyStatus("The answer is being written…");
  } else if (event === "token") {
    if (run.phase !== "streaming") { run.phase = "streaming"; updateStopButton(run); }
    liveAnswer(run, box);
    run.raw += payload.text || "";
    renderLive(run);
  } else if (event === "done" && payload.message) {
    hideQueue(run);
    const final = renderOne(payload.message, []);
    if (run.live) run.live.replaceWith(final); else box.append(final);
    run.live = null;
    run.phase = "done";
    const finish = (payload.message.meta || {}).finish_reason;
    replyStatus(finish === "stopped" ? "Stopped." : finish === "length" ? "Answer complete (cut at max_tokens)." : "Answer complete.");
    if (payload.user_status && run.userArticle) run.userArticle.dataset.status = payload.user_status;
  } else if (event === "cancelled") {
    hideQueue(run);
    run.phase = "cancelled";
    const article = run.userArticle || box.querySelector(`article.message[data-id="${payload.user_message_id}"]`);
    if (article && run.kind === "send") {
      article.dataset.status = "cancelled";
      if (!article.querySelector(".note.cancelled")) article.append(el("div", { class: "note cancelled", text: "cancelled (not sent)" }));
    }
    replyStatus("Cancelled: your message was not sent.");
  } else if (event === "error") {
    showBanner(`The answer failed: ${payload.error || payload.message || "unknown error"}`, "error");
  }
}

// ------------------------------------------------------------ waiting in line

// The place and the estimate are the server's (it sends them again when they change, and every few seconds);
// only the time waited so far counts on here, so nothing shown goes stale between two `queued` events.
function queueText(q) {
  const ahead = q.ahead != null ? q.ahead : Math.max(0, (q.position || 1) - 1);
  const place = ahead === 0 ? "you are next" : `${ahead} in line ahead of you`;
  let text = `Waiting — ${place}`;
  if (q.estimate_s != null) text += `, about ${Math.max(1, Math.ceil(q.estimate_s))} s`;
  if (q.reason === "retrying") text += " (the model node is busy: trying again)";
  return text;
}

function waitedText(q) {
  const waited = (q.waited_s || 0) + (Date.now() - q.at) / 1000;
  return waited >= 1 ? `waited ${duration(waited)}` : "";
}

function showQueue(run, payload, box) {
  const previous = run.queue;
  run.queue = { ...payload, at: Date.now() };
  if (!run.queueBox) {
    const cancel = el("button", { class: "secondary small", type: "button", text: "Cancel" });
    cancel.setAttribute("aria-label", "Cancel this message");
    cancel.addEventListener("click", stopReply);
    run.queueBox = el("div", { class: "queue-notice", "data-state": "queued" },
      el("span", { class: "spinner", "aria-hidden": "true" }), el("span", { class: "queue-text" }),
      el("span", { class: "queue-waited" }), cancel);
    if (run.userArticle && run.userArticle.isConnected) run.userArticle.after(run.queueBox); else box.append(run.queueBox);
    run.timer = setInterval(() => {
      if (run.queue && run.queueBox) run.queueBox.querySelector(".queue-waited").textContent = waitedText(run.queue);
    }, 1000);
  }
  run.queueBox.dataset.position = String(payload.position ?? "");
  run.queueBox.dataset.ahead = String(payload.ahead ?? "");
  run.queueBox.title = payload.detail || "";
  const text = queueText(run.queue);
  run.queueBox.querySelector(".queue-text").textContent = text;
  run.queueBox.querySelector(".queue-waited").textContent = waitedText(run.queue);
  if (!previous || previous.ahead !== payload.ahead || previous.reason !== payload.reason) replyStatus(text);
}

function hideQueue(run) {
  clearInterval(run.timer);
  run.timer = null;
  if (run.queueBox) run.queueBox.remove();
  run.queueBox = null;
}

// ---------------------------------------------------------------------------- wiring

function autoGrow() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 200) + "px";
}

async function boot() {
  loadAuthConfig();
  let response;
  try {
    response = await request("/api/session", { allow401: true });
  } catch (err) {
    showLogin();
    loginError(`The chat node cannot be reached (${err.message}); reload the page to try again.`);
    return;
  }
  if (response.ok) startApp(await response.json(), response, false);
  else showLogin();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", submitLogin);
  $("logout").addEventListener("click", logout);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const content = $("input").value;
    if (content.trim()) send(content);
  });
  $("input").addEventListener("keydown", (e) => {
    // Enter sends, Shift+Enter is a new line; Escape stops the answer being written
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); if (!state.sending) $("composer").requestSubmit(); }
    else if (e.key === "Escape" && state.run) { e.preventDefault(); stopReply(); }
  });
  $("stop").addEventListener("click", stopReply);
  $("input").addEventListener("input", autoGrow);
  $("new-conversation").addEventListener("click", () => {
    state.current = null;
    showView("chat");
    renderMessages([]);
    loadConversations().catch(ignoreSignedOut(() => {}));
    $("input").focus();
  });
  $("menu").addEventListener("click", () => {
    const open = document.body.classList.toggle("nav-open");
    $("menu").setAttribute("aria-expanded", String(open));
  });
  $("open-account").addEventListener("click", () => { showView("account"); loadAccount(); });
  $("open-admin").addEventListener("click", () => { showView("admin"); loadAdmin(); });
  for (const back of document.querySelectorAll(".panel-view .back")) {
    back.addEventListener("click", () => { showView("chat"); if (state.current) selectConversation(state.current); });
  }
  $("key-form").addEventListener("submit", createKey);
  $("copy-key").addEventListener("click", copyKey);
  $("password-form").addEventListener("submit", changePassword);
  $("add-user-form").addEventListener("submit", addUser);
  window.addEventListener("hashchange", () => route());
  for (const kind of ["keydown", "pointerdown", "pointermove", "wheel", "touchstart"]) {
    document.addEventListener(kind, noteActivity, { passive: true, capture: true });
  }
  document.addEventListener("visibilitychange", () => { if (!document.hidden) noteActivity(); });
  boot();
});
