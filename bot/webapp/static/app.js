// The Mini App's page: the user's conversation (the same one the Telegram chat continues),
// a reply streamed as it is generated, Stop and Regenerate, and the memory and settings.
//
// Who is asking is Telegram's signed launch data (initData), sent with every request as
// `Authorization: tma <initData>`: from Telegram's script when it loaded, else from the URL
// fragment (`#tgWebAppData=...`), where Telegram's clients and the operator's link put it.
// Every text from the server is shown with textContent, never parsed as HTML.
"use strict";

const API = "api";
const $ = (id) => document.getElementById(id);

function launchParams() {
  const hash = new URLSearchParams(window.location.hash.slice(1));
  const telegram = window.Telegram && window.Telegram.WebApp;
  let theme = {};
  try {
    theme = JSON.parse(hash.get("tgWebAppThemeParams") || "{}");
  } catch (error) {
    theme = {};
  }
  if (telegram && telegram.themeParams && Object.keys(telegram.themeParams).length) {
    theme = telegram.themeParams;
  }
  const initData = (telegram && telegram.initData) || hash.get("tgWebAppData") || "";
  return { initData, theme, telegram };
}

function applyTheme(theme) {
  // Telegram's names (bg_color) become its CSS variables (--tg-theme-bg-color).
  for (const [key, value] of Object.entries(theme)) {
    if (typeof value === "string" && /^#[0-9a-fA-F]{3,8}$/.test(value)) {
      document.documentElement.style.setProperty(`--tg-theme-${key.replace(/_/g, "-")}`, value);
    }
  }
}

let launch = launchParams();
let busy = null; // the AbortController of the reply being streamed
let oldest = null; // the id of the oldest message shown, for the next page
let canRegenerate = false;

function showReopen(text) {
  $("reopen-text").textContent = text || "Откройте страницу заново из Telegram.";
  $("reopen").hidden = false;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

async function call(method, path, body) {
  const options = { method, headers: { Authorization: `tma ${launch.initData}` } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(`${API}/${path}`, options);
  if (response.status === 401 || response.status === 403) {
    const data = await response.json().catch(() => ({}));
    showReopen(data.text);
    throw new Error(`refused: ${response.status}`);
  }
  return response;
}

async function callJson(method, path, body) {
  const response = await call(method, path, body);
  const data = response.status === 204 ? {} : await response.json().catch(() => ({}));
  if (!response.ok) {
    notice(data.text || `Ошибка ${response.status}`);
    throw new Error(data.error || String(response.status));
  }
  return data;
}

// -- the conversation ---------------------------------------------------------------------

function bubble(role, text) {
  const item = document.createElement("li");
  item.className = role === "user" ? "user" : "bot";
  item.textContent = text;
  return item;
}

function scrollToEnd() {
  const view = $("chat-view");
  view.scrollTop = view.scrollHeight;
}

async function loadMessages(before) {
  const data = await callJson("GET", before ? `messages?before=${before}` : "messages");
  const list = $("messages");
  // newest first from the server: each older one goes above what is shown
  for (const message of data.messages) {
    list.insertBefore(bubble(message.role, message.text), list.firstChild);
    oldest = message.id;
  }
  $("more").hidden = !data.more;
  $("empty").hidden = list.children.length > 0;
  if (!before) {
    canRegenerate = data.regenerable;
    scrollToEnd();
  }
  updateButtons();
}

function updateButtons() {
  $("send").hidden = busy !== null;
  $("stop").hidden = busy === null;
  $("regenerate").hidden = busy !== null || !canRegenerate;
}

async function streamReply(path, body, target) {
  const controller = new AbortController();
  busy = controller;
  updateButtons();
  notice("");
  target.classList.add("streaming");
  try {
    const response = await call("POST", path, body === undefined ? {} : body);
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      target.remove();
      notice(data.text || `Ошибка ${response.status}`);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffered.indexOf("\n")) >= 0) {
        const line = JSON.parse(buffered.slice(0, end));
        buffered = buffered.slice(end + 1);
        if (line.error) {
          target.remove();
          notice(line.text);
        } else {
          target.textContent = line.text;
          scrollToEnd();
        }
      }
    }
    canRegenerate = true;
  } catch (error) {
    if (error.name !== "AbortError") {
      if (!$("reopen").hidden) return;
      notice("Связь прервалась. Попробуйте ещё раз.");
    }
    canRegenerate = true;
  } finally {
    if (!target.textContent) target.remove(); // stopped before the first words
    target.classList.remove("streaming");
    busy = null;
    updateButtons();
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text || busy) return;
  $("text").value = "";
  const list = $("messages");
  list.appendChild(bubble("user", text));
  const reply = bubble("bot", "");
  list.appendChild(reply);
  $("empty").hidden = true;
  scrollToEnd();
  await streamReply("messages", { text }, reply);
}

function stop() {
  if (busy) busy.abort();
}

async function regenerate() {
  if (busy) return;
  const list = $("messages");
  const last = list.lastElementChild;
  const reply = bubble("bot", "");
  if (last && last.classList.contains("bot")) {
    list.replaceChild(reply, last);
  } else {
    list.appendChild(reply);
  }
  await streamReply("regenerate", undefined, reply);
}

// -- memory and settings ------------------------------------------------------------------

async function loadMemory() {
  const data = await callJson("GET", "memory");
  $("memory-enabled").checked = data.enabled;
  const list = $("facts");
  list.replaceChildren();
  for (const fact of data.facts) {
    const item = document.createElement("li");
    const text = document.createElement("span");
    const label = document.createElement("b");
    label.textContent = `${fact.label}: `;
    text.append(label, document.createTextNode(fact.value));
    const forget = document.createElement("button");
    forget.type = "button";
    forget.textContent = "Забыть";
    forget.dataset.factId = String(fact.id);
    forget.addEventListener("click", async () => {
      await callJson("DELETE", `memory/facts/${fact.id}`).catch(() => {});
      await loadMemory();
    });
    item.append(text, forget);
    list.appendChild(item);
  }
  $("no-facts").hidden = data.facts.length > 0;
}

async function loadSettings() {
  const me = await callJson("GET", "me");
  $("who").textContent = me.name || "";
  const input = $("temperature");
  input.min = me.temperature_min;
  input.max = me.temperature_max;
  input.value = me.temperature;
  $("settings-note").textContent = `От ${me.temperature_min} до ${me.temperature_max}: выше — смелее ответы.`;
  $("text").maxLength = me.max_chars;
}

async function saveSettings(event) {
  event.preventDefault();
  try {
    const me = await callJson("PUT", "settings", { temperature: $("temperature").value });
    $("temperature").value = me.temperature;
    $("settings-note").textContent = `Сохранено: ${me.temperature}.`;
  } catch (error) {
    $("settings-note").textContent = $("notice").textContent;
  }
}

async function toggleMemory() {
  await callJson("PUT", "settings", { memory: $("memory-enabled").checked }).catch(() => {});
  await loadMemory();
}

function showTab(name) {
  const chat = name === "chat";
  $("chat-view").hidden = !chat;
  $("composer").hidden = !chat;
  $("memory-view").hidden = chat;
  $("tab-chat").setAttribute("aria-selected", String(chat));
  $("tab-memory").setAttribute("aria-selected", String(!chat));
  if (!chat) loadMemory().catch(() => {});
}

// -- start --------------------------------------------------------------------------------

function withTelegram() {
  // Inside Telegram: its theme, and tell it the page is ready and may take the whole height.
  const telegram = window.Telegram && window.Telegram.WebApp;
  if (!telegram) return;
  launch = launchParams();
  applyTheme(launch.theme);
  telegram.ready();
  telegram.expand();
}

function start() {
  launch = launchParams();
  applyTheme(launch.theme);
  withTelegram();
  const script = document.getElementById("telegram-script");
  if (script) script.addEventListener("load", withTelegram);
  if (!launch.initData) {
    showReopen();
    return;
  }
  $("send-form").addEventListener("submit", send);
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("stop").addEventListener("click", stop);
  $("regenerate").addEventListener("click", regenerate);
  $("more").addEventListener("click", () => loadMessages(oldest).catch(() => {}));
  $("tab-chat").addEventListener("click", () => showTab("chat"));
  $("tab-memory").addEventListener("click", () => showTab("memory"));
  $("memory-enabled").addEventListener("change", toggleMemory);
  $("settings-form").addEventListener("submit", saveSettings);
  loadSettings().catch(() => {});
  loadMessages().catch(() => {});
}

// Telegram's script (async) sets window.Telegram.WebApp when it loads; offline it never does,
// and the page does not wait for it.
start();
