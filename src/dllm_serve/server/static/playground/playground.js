// dllm-serve playground: streams a generation with stream_mode "denoise" and draws the canvas.
// No build step, no dependencies, no network beyond this server. See docs/playground.md.
"use strict";

const $ = (id) => document.getElementById(id);
const KNOWN_CHOICES = {
  rule: ["schedule", "threshold", "factor", "hierarchy", "credit"],
  remasking: ["low_confidence", "margin", "entropy", "random"],
};
const HIDDEN_DEFAULTS = new Set(["cache"]); // shown in the lane title; not a request field

const app = { presets: new Map(), lanes: [], controller: null, colour: "step" };

// ------------------------------------------------------------------ API

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body && body.error && body.error.message) || response.statusText;
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

async function getJSON(path) {
  const response = await fetch(path, { headers: apiHeaders() });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

// Server-sent events from a fetch response: yields each parsed `data:` payload until [DONE].
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ------------------------------------------------------------------ canvas state

// Fold denoise events into per-position state. `upTo` limits how many events are applied (replay).
function foldState(events, upTo) {
  const s = { length: 0, blockStart: 0, blockLength: 0, step: 0, cells: [], latest: new Set() };
  const n = Math.min(upTo, events.length);
  for (let k = 0; k < n; k++) {
    const ev = events[k];
    if (s.length !== ev.canvas_length) {
      s.length = ev.canvas_length;
      while (s.cells.length < s.length) s.cells.push(null);
    }
    s.blockStart = ev.block_start;
    s.blockLength = ev.block_length;
    s.step = ev.step;
    if (k === n - 1) s.latest = new Set(ev.committed.map((c) => c[0]));
    for (const [pos, id, text, conf] of ev.masked) s.cells[pos] = { id, text, conf, step: null };
    for (const [pos, id, text, conf] of ev.committed) s.cells[pos] = { id, text, conf, step: ev.step };
  }
  return s;
}

const SPECIAL_NAMES = { endoftext: "EOS", eot_id: "EOT", im_end: "EOT", mdm_mask: "MASK" };

// A token's text as drawn in a cell: visible whitespace, special tokens by a short name.
function cellText(text) {
  const special = /^<\|(.+)\|>$/.exec(text);
  if (special) return SPECIAL_NAMES[special[1]] || special[1];
  return text.replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/^ /, "·");
}

function fillFor(cell, maxStep, colour) {
  if (colour === "confidence") {
    const c = Math.max(0, Math.min(1, cell.conf));
    return `hsl(${Math.round(120 * c)} 65% 72%)`;
  }
  const t = maxStep > 1 ? (cell.step - 1) / (maxStep - 1) : 0;
  return `hsl(${Math.round(210 - 180 * t)} 70% 72%)`;
}

function drawState(canvas, s, maxStep, colour) {
  const ctx = canvas.getContext("2d");
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(200, canvas.clientWidth || canvas.parentElement.clientWidth || 600);
  const cols = width >= 640 ? 16 : 8;
  const cw = width / cols;
  const ch = 26;
  const rows = Math.max(1, Math.ceil(s.length / cols));
  canvas.style.height = rows * ch + "px";
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(rows * ch * ratio);
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, rows * ch);
  ctx.font = "12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace";
  ctx.textBaseline = "middle";
  for (let pos = 0; pos < s.length; pos++) {
    const x = (pos % cols) * cw;
    const y = Math.floor(pos / cols) * ch;
    const cell = s.cells[pos];
    const committed = cell && cell.step !== null;
    ctx.fillStyle = committed ? fillFor(cell, maxStep, colour) : "#eceef3";
    ctx.fillRect(x + 1, y + 1, cw - 2, ch - 2);
    if (cell) {
      ctx.globalAlpha = committed ? 1 : 0.25 + 0.45 * Math.max(0, Math.min(1, cell.conf));
      ctx.fillStyle = committed ? "#11161f" : "#4a5263";
      let label = cellText(cell.text);
      while (label.length > 1 && ctx.measureText(label).width > cw - 6) label = label.slice(0, -1);
      ctx.fillText(label, x + 3, y + ch / 2);
      ctx.globalAlpha = 1;
    }
    const active = pos >= s.blockStart && pos < s.blockStart + s.blockLength;
    if (s.latest.has(pos)) {
      ctx.strokeStyle = "#11161f";
      ctx.lineWidth = 2;
      ctx.strokeRect(x + 2, y + 2, cw - 4, ch - 4);
    } else if (active && !committed) {
      ctx.strokeStyle = "#2457c5";
      ctx.lineWidth = 1;
      ctx.strokeRect(x + 1.5, y + 1.5, cw - 3, ch - 3);
    }
  }
}

// ------------------------------------------------------------------ one lane (a run)

class Lane {
  constructor(root, settings, label) {
    this.root = root;
    this.settings = settings;
    this.label = label;
    root.append($("lane-template").content.cloneNode(true));
    this.q = (sel) => root.querySelector(sel);
    this.canvas = this.q("canvas");
    this.events = [];
    this.shown = 0;
    this.frames = 0;
    this.timer = null;
    this.q(".scrub").addEventListener("input", (e) => this.show(Number(e.target.value)));
    this.q(".prev").addEventListener("click", () => this.show(this.shown - 1));
    this.q(".next").addEventListener("click", () => this.show(this.shown + 1));
    this.q(".play").addEventListener("click", () => this.replay());
    settings.querySelector(".algorithm").addEventListener("change", () => this.renderParams());
  }

  get algorithm() {
    return this.settings.querySelector(".algorithm").value;
  }

  renderParams() {
    const box = this.settings.querySelector(".params");
    box.replaceChildren();
    const preset = app.presets.get(this.algorithm);
    if (!preset) return;
    for (const [name, value] of Object.entries(preset.defaults)) {
      if (HIDDEN_DEFAULTS.has(name)) continue;
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.name = name;
      input.dataset.default = JSON.stringify(value);
      if (typeof value === "boolean") {
        label.className = "bool";
        input.type = "checkbox";
        input.checked = value;
        label.append(input, name);
      } else {
        if (typeof value === "number") {
          input.type = "number";
          input.step = "any";
          input.value = String(value);
        } else {
          input.type = "text";
          input.value = value === null ? "" : String(value);
          if (KNOWN_CHOICES[name]) {
            const list = document.createElement("datalist");
            list.id = `${this.label}-${name}-choices`;
            for (const v of KNOWN_CHOICES[name]) list.append(new Option(v, v));
            input.setAttribute("list", list.id);
            label.append(list);
          }
        }
        label.append(name, input);
      }
      box.append(label);
    }
  }

  // Only parameters the user changed are sent, so the checkpoint's own defaults still apply.
  overrides() {
    const out = {};
    for (const input of this.settings.querySelectorAll(".params input")) {
      const def = JSON.parse(input.dataset.default);
      let value;
      if (input.type === "checkbox") value = input.checked;
      else if (input.type === "number") value = input.value === "" ? def : Number(input.value);
      else if (def === null) {
        // An optional knob that is off by default (max_steps_per_block, ...): empty stays off,
        // a number is sent as a number.
        const text = input.value.trim();
        value = text === "" ? null : Number.isFinite(Number(text)) ? Number(text) : text;
      } else value = input.value;
      if (value !== def) out[input.name] = value;
    }
    return out;
  }

  setStatus(status) {
    this.root.dataset.status = status;
  }

  reset(title) {
    this.stopReplay();
    this.events = [];
    this.shown = 0;
    this.frames = 0;
    this.root.dataset.frames = "0";
    this.text = "";
    this.q(".title").textContent = title;
    this.q(".output").textContent = "";
    this.q(".error").textContent = "";
    this.q(".forwards").textContent = "0";
    this.q(".refreshes").textContent = "0";
    this.q(".tpf").textContent = "–";
    this.q(".elapsed").textContent = "–";
    this.q(".scrub").max = "0";
    this.q(".scrub").value = "0";
    this.committed = 0;
    this.refreshes = 0;
    this.draw(0);
  }

  draw(upTo) {
    const s = foldState(this.events, upTo);
    const maxStep = this.events.length ? this.events[this.events.length - 1].step : 1;
    drawState(this.canvas, s, maxStep, app.colour);
    this.q(".shown").textContent = `${Math.min(upTo, this.events.length)} / ${this.events.length}`;
    const done = s.cells.filter((c) => c && c.step !== null).length;
    this.canvas.setAttribute(
      "aria-label",
      `denoising canvas at step ${s.step}: ${done} of ${s.length} positions committed`,
    );
  }

  show(k) {
    this.shown = Math.max(0, Math.min(this.events.length, k));
    this.q(".scrub").value = String(this.shown);
    this.draw(this.shown);
  }

  replay() {
    this.stopReplay();
    this.show(0);
    this.timer = setInterval(() => {
      if (this.shown >= this.events.length) this.stopReplay();
      else this.show(this.shown + 1);
    }, 150);
  }

  stopReplay() {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }

  async run(body, signal) {
    const chat = body.messages !== undefined;
    this.reset(`${body.algorithm}`);
    this.setStatus("running");
    const started = performance.now();
    const tick = setInterval(() => this.elapsed(started), 100);
    try {
      const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
        method: "POST",
        headers: apiHeaders(),
        body: JSON.stringify(body),
        signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const chunk of sseData(response)) {
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) this.onChoice(choice, chat);
        if (chunk.diffusion) this.onFinal(chunk.diffusion);
      }
      this.setStatus("done");
    } catch (err) {
      if (err.name === "AbortError") {
        this.setStatus("stopped");
      } else {
        this.q(".error").textContent = String(err.message || err);
        this.setStatus("error");
      }
    } finally {
      clearInterval(tick);
      this.elapsed(started);
      this.q(".scrub").max = String(this.events.length);
      this.show(this.events.length);
    }
  }

  elapsed(started) {
    this.q(".elapsed").textContent = `${((performance.now() - started) / 1000).toFixed(2)} s`;
  }

  onChoice(choice, chat) {
    if (choice.denoise) {
      const ev = choice.denoise;
      this.events.push(ev);
      this.committed += ev.committed.length;
      this.refreshes += ev.refresh ? 1 : 0;
      this.q(".refreshes").textContent = String(this.refreshes);
      this.q(".forwards").textContent = String(ev.step);
      this.q(".tpf").textContent = (this.committed / ev.step).toFixed(2);
      this.q(".scrub").max = String(this.events.length);
      this.q(".scrub").value = String(this.events.length);
      this.shown = this.events.length;
      this.draw(this.shown);
      this.frames += 1;
      this.root.dataset.frames = String(this.frames);
    }
    const delta = chat ? choice.delta && choice.delta.content : choice.text;
    if (delta) {
      this.text += delta;
      this.q(".output").textContent = this.text;
    }
  }

  onFinal(diffusion) {
    this.q(".forwards").textContent = String(diffusion.forwards);
    const tpf = diffusion.tokens_per_forward;
    if (tpf !== undefined) this.q(".tpf").textContent = Number(tpf).toFixed(2);
  }
}

// ------------------------------------------------------------------ page

function requestBody(lane) {
  const chat = document.querySelector('input[name="mode"]:checked').value === "chat";
  const prompt = $("prompt").value;
  const body = {
    model: $("model").value || undefined,
    max_tokens: Number($("max-tokens").value) || 64,
    stream: true,
    stream_mode: "denoise",
    algorithm: lane.algorithm,
    ...lane.overrides(),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("steps").value !== "") body.steps = Number($("steps").value);
  if (chat) body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  return body;
}

async function runAll(event) {
  event.preventDefault();
  const [a, b] = app.lanes;
  const active = b.algorithm ? [a, b] : [a];
  b.root.hidden = !b.algorithm;
  app.controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  await Promise.all(active.map((lane) => lane.run(requestBody(lane), app.controller.signal)));
  $("run").disabled = false;
  $("stop").disabled = true;
}

function fillAlgorithms(catalogue) {
  app.presets = new Map(catalogue.data.map((p) => [p.name, p]));
  for (const [lane, keepNone] of [[app.lanes[0], false], [app.lanes[1], true]]) {
    const select = lane.settings.querySelector(".algorithm");
    select.replaceChildren();
    if (keepNone) select.append(new Option("none", ""));
    for (const p of catalogue.data) {
      const cache = p.defaults.cache === "none" ? "no cache" : `${p.defaults.cache} cache`;
      const option = new Option(`${p.name} (${cache})`, p.name);
      option.title = p.description;
      select.append(option);
    }
    if (!keepNone) select.value = catalogue.default || catalogue.data[0].name;
    lane.renderParams();
  }
}

async function connect() {
  const status = $("server-status");
  try {
    const [models, catalogue] = await Promise.all([getJSON("/v1/models"), getJSON("/v1/algorithms")]);
    const select = $("model");
    select.replaceChildren(...models.data.map((m) => new Option(m.id, m.id)));
    fillAlgorithms(catalogue);
    status.textContent = `model ${catalogue.model} · default algorithm ${catalogue.default}`;
    $("run").disabled = false;
    document.body.dataset.ready = "true";
  } catch (err) {
    status.textContent = `Cannot read the API: ${err.message}`;
    $("run").disabled = true;
  }
}

async function start() {
  app.lanes = [
    new Lane($("lane-a"), $("settings-a"), "a"),
    new Lane($("lane-b"), $("settings-b"), "b"),
  ];
  $("controls").addEventListener("submit", runAll);
  $("stop").addEventListener("click", () => app.controller && app.controller.abort());
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  for (const radio of document.querySelectorAll('input[name="colour"]')) {
    radio.addEventListener("change", () => {
      app.colour = radio.value;
      for (const lane of app.lanes) {
        lane.q(".legend").classList.toggle("confidence", app.colour === "confidence");
        lane.q(".legend-text").textContent =
          app.colour === "confidence" ? "low → high confidence" : "early → late commit";
        lane.draw(lane.shown);
      }
    });
  }
  window.addEventListener("resize", () => app.lanes.forEach((lane) => lane.draw(lane.shown)));
  $("run").disabled = true;
  const config = await fetch("config.json").then((r) => r.json());
  if (config.api_key_required && !$("api-key").value) {
    $("server-status").textContent = "This server needs an API key: enter it and press Connect.";
    $("api-key").focus();
    return;
  }
  await connect();
}

start().catch((err) => {
  $("server-status").textContent = `Cannot reach the server: ${err.message || err}`;
});
