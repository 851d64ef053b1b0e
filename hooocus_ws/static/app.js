// Hooocus page: a hooocus.v1 websocket client with no build step. See docs/protocol.md.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  // The server's seed range (engine/core/constants.py MAX_SEED = 2^63 - 1). BigInt because a JS number
  // is exact only up to 2^53; the seed itself travels as a decimal string.
  const MAX_SEED = (1n << 63n) - 1n;
  // The pseudo-style that turns on the prompt expansion; offered only when the server has it installed.
  const EXPANSION_STYLE = "Fooocus V2";
  const state = {
    ws: null, token: "", job: null, generateId: null, seeds: [], resultUrls: [], previewUrl: null,
    defaults: {}, galleryUrls: [], galleryBefore: null,
    // The input image: its server reference ("sha256:<hex>") and the object URL shown under the mask.
    inputRef: null, inputUrl: null, maskPainted: false,
  };
  const auth = () => ({ Authorization: "Bearer " + state.token });

  function status(text, isError) {
    $("status").textContent = text;
    $("status").className = isError ? "error" : "";
  }

  function fill(select, values, selected) {
    select.replaceChildren(...values.map((v) => {
      const opt = document.createElement("option");
      opt.value = opt.textContent = v;
      if (v === selected) opt.selected = true;
      return opt;
    }));
  }

  async function loadOptions() {
    const res = await fetch("/v1/options", { headers: { Authorization: "Bearer " + state.token } });
    if (!res.ok) throw new Error("options: HTTP " + res.status);
    const o = await res.json();
    const d = o.defaults || {};
    fill($("performance"), o.performances || [], d.performance);
    fill($("aspect"), o.aspect_ratios || [], d.aspect_ratio);
    // Only an explicit true offers the expansion: a server that does not say has no way to run it,
    // and picking it would only earn a warning.
    const styles = (o.styles || []).filter((s) => s !== EXPANSION_STYLE || o.expansion_available === true);
    fill($("styles"), styles, null);
    renderChips();
    state.defaults = d;
    // "" = let the server choose (its default model, no refiner, the checkpoint's VAE): sending a name
    // would override a server preset.
    fillNamed($("adv-model"), o.models || [], "server default");
    fillNamed($("adv-refiner"), o.refiners || [], "None");
    fillNamed($("adv-vae"), o.vaes || [], "Default (model)");
    fill($("adv-sampler"), o.samplers || [], d.sampler);
    fill($("adv-scheduler"), o.schedulers || [], d.scheduler);
    state.loraNames = o.loras || [];
    buildLoras();
    resetAdvanced();
    loadGallery(false);
  }

  function fillNamed(select, names, noneLabel) {
    fill(select, ["", ...names], "");
    select.options[0].textContent = noneLabel;
  }

  // -- advanced panel ----------------------------------------------------------------------------
  // Number fields and the request field each one sets. A field is sent only when it differs from the
  // server's default (GET /v1/options "defaults"): an untouched panel sends nothing, so a server preset
  // still applies.
  const NUMBER_FIELDS = {
    "adv-refiner-switch": "refiner_switch", "adv-cfg": "cfg", "adv-sharpness": "sharpness",
    "adv-clip-skip": "clip_skip", "adv-adaptive-cfg": "adaptive_cfg", "adv-adm-positive": "adm_scaler_positive",
    "adv-adm-negative": "adm_scaler_negative", "adv-adm-end": "adm_scaler_end",
  };
  const FREEU_KEYS = ["b1", "b2", "s1", "s2"];
  const MAX_LORAS = 5;  // engine/core/constants.py MAX_LORAS

  function buildLoras() {
    const rows = [];
    for (let i = 0; i < MAX_LORAS; i++) {
      const row = document.createElement("div");
      row.className = "lora-row";
      const name = document.createElement("select");
      name.className = "lora-name";
      name.setAttribute("aria-label", "LoRA " + (i + 1));
      fillNamed(name, state.loraNames || [], "None");
      const weight = document.createElement("input");
      Object.assign(weight, { type: "number", min: "-2", max: "2", step: "0.01", value: "1", className: "lora-weight" });
      weight.setAttribute("aria-label", "LoRA " + (i + 1) + " weight");
      const enabled = document.createElement("input");
      Object.assign(enabled, { type: "checkbox", checked: true, className: "lora-enabled" });
      enabled.setAttribute("aria-label", "LoRA " + (i + 1) + " enabled");
      row.append(name, weight, enabled);
      rows.push(row);
    }
    $("loras").replaceChildren(...rows);
  }

  function resetAdvanced() {
    const d = state.defaults;
    for (const [id, key] of Object.entries(NUMBER_FIELDS)) $(id).value = d[key] ?? "";
    for (const id of ["adv-model", "adv-refiner", "adv-vae", "adv-steps", "adv-width", "adv-height"]) $(id).value = "";
    $("adv-sampler").value = d.sampler || $("adv-sampler").value;
    $("adv-scheduler").value = d.scheduler || $("adv-scheduler").value;
    $("adv-format").value = d.output_format || "png";
    const freeu = d.freeu;
    $("adv-freeu").checked = !!(freeu && freeu.enabled);
    if (freeu) for (const k of FREEU_KEYS) $("adv-freeu-" + k).value = freeu[k];
    for (const row of $("loras").children) {
      row.querySelector(".lora-name").value = "";
      row.querySelector(".lora-weight").value = "1";
      row.querySelector(".lora-enabled").checked = true;
    }
  }

  // The advanced fields that differ from the server's defaults, or null with an error shown.
  function readAdvanced(params) {
    const d = state.defaults;
    for (const [id, key] of Object.entries(NUMBER_FIELDS)) {
      const text = $(id).value.trim();
      if (text === "") continue;
      const value = Number(text);
      if (!Number.isFinite(value)) { status(key + ": not a number", true); return false; }
      if (value !== d[key]) params[key] = value;
    }
    const steps = $("adv-steps").value.trim();
    if (steps) params.steps = parseInt(steps, 10);
    const w = $("adv-width").value.trim(), h = $("adv-height").value.trim();
    if (w || h) { params.width = parseInt(w, 10); params.height = parseInt(h, 10); }
    for (const [id, key] of [["adv-model", "base_model"], ["adv-refiner", "refiner_model"], ["adv-vae", "vae"]]) {
      if ($(id).value) params[key] = $(id).value;
    }
    for (const [id, key] of [["adv-sampler", "sampler"], ["adv-scheduler", "scheduler"], ["adv-format", "output_format"]]) {
      if ($(id).value && $(id).value !== d[key]) params[key] = $(id).value;
    }
    const freeu = { enabled: $("adv-freeu").checked };
    for (const k of FREEU_KEYS) freeu[k] = Number($("adv-freeu-" + k).value);
    const dFreeu = d.freeu || { enabled: false };
    if (freeu.enabled !== !!dFreeu.enabled || (freeu.enabled && FREEU_KEYS.some((k) => freeu[k] !== dFreeu[k]))) {
      params.freeu = freeu;
    }
    const loras = [];
    for (const row of $("loras").children) {
      const name = row.querySelector(".lora-name").value;
      if (!name) continue;
      loras.push({ name, weight: Number(row.querySelector(".lora-weight").value),
                   enabled: row.querySelector(".lora-enabled").checked });
    }
    if (loras.length) params.loras = loras;
    return true;
  }

  function selectValue(select, value) {
    // A name the list does not have (another server's model) is added rather than silently lost:
    // the server then says clearly that it does not know it.
    if (value === null || value === undefined) return;
    value = String(value);
    if (!Array.from(select.options).some((o) => o.value === value)) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = value;
      select.append(opt);
    }
    select.value = value;
  }

  // Fill the form from request fields (a job's request, an image's metadata). Absent fields keep the
  // server's defaults, as Fooocus's "Load Parameters" leaves what the metadata does not say.
  function applyParams(p, seed) {
    resetAdvanced();
    if (p.prompt !== undefined) $("prompt").value = p.prompt;
    if (p.negative_prompt !== undefined) $("negative").value = p.negative_prompt;
    if (p.performance) selectValue($("performance"), p.performance);
    const size = p.width && p.height ? p.width + "*" + p.height : null;
    if (size && Array.from($("aspect").options).some((o) => o.value === size)) {
      $("aspect").value = size;
    } else if (size) {
      $("adv-width").value = p.width;
      $("adv-height").value = p.height;
    } else if (p.aspect_ratio) selectValue($("aspect"), p.aspect_ratio);
    if (p.image_number) $("count").value = p.image_number;
    const s = seed ?? p.seed;
    $("seed").value = s === null || s === undefined ? "" : String(s);
    seedError("");
    if (Array.isArray(p.styles)) setStyles(p.styles);
    if (p.steps) $("adv-steps").value = p.steps;
    for (const [id, key] of Object.entries(NUMBER_FIELDS)) if (p[key] !== undefined && p[key] !== null) $(id).value = p[key];
    for (const [id, key] of [["adv-model", "base_model"], ["adv-refiner", "refiner_model"], ["adv-vae", "vae"],
                             ["adv-sampler", "sampler"], ["adv-scheduler", "scheduler"], ["adv-format", "output_format"]]) {
      if (p[key]) selectValue($(id), p[key]);
    }
    if (p.freeu) {
      $("adv-freeu").checked = p.freeu.enabled !== false;
      for (const k of FREEU_KEYS) if (p.freeu[k] !== undefined) $("adv-freeu-" + k).value = p.freeu[k];
    }
    const rows = Array.from($("loras").children);
    (p.loras || []).slice(0, rows.length).forEach((lora, i) => {
      selectValue(rows[i].querySelector(".lora-name"), lora.name);
      rows[i].querySelector(".lora-weight").value = lora.weight ?? 1;
      rows[i].querySelector(".lora-enabled").checked = lora.enabled !== false;
    });
  }

  // -- style picker ------------------------------------------------------------------------------
  function setStyles(names) {
    const wanted = new Set(names);
    for (const name of names) selectValue($("styles"), name);
    for (const opt of $("styles").options) opt.selected = wanted.has(opt.value);
    // selectValue set the select's single value; restore the full selection.
    for (const opt of $("styles").options) opt.selected = wanted.has(opt.value);
    state.styleOrder = [...names];
    renderChips();
  }

  // The selected styles in the order they were picked: Fooocus applies styles in order, so the
  // chips and the request keep it (a loaded job or image sets it whole).
  function selectedStyles() {
    const selected = new Set(Array.from($("styles").selectedOptions, (o) => o.value));
    const order = (state.styleOrder || []).filter((name) => selected.has(name));
    for (const name of selected) if (!order.includes(name)) order.push(name);
    state.styleOrder = order;
    return order;
  }

  function renderChips() {
    const byName = new Map(Array.from($("styles").options, (o) => [o.value, o]));
    $("style-chips").replaceChildren(...selectedStyles().map((name) => byName.get(name)).map((opt) => {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.dataset.style = opt.value;
      const x = document.createElement("button");
      x.type = "button";
      x.textContent = "×";
      x.setAttribute("aria-label", "remove " + opt.value);
      x.addEventListener("click", () => { opt.selected = false; renderChips(); });
      chip.append(opt.value, x);
      return chip;
    }));
  }

  function filterStyles() {
    const words = $("style-search").value.toLowerCase().split(/\s+/).filter(Boolean);
    for (const opt of $("styles").options) {
      const name = opt.value.toLowerCase();
      opt.hidden = !words.every((w) => name.includes(w));
    }
  }

  function clearPreview() {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = null;
    $("preview").removeAttribute("src");
    $("preview").hidden = true;
  }

  function clearJobView() {
    for (const url of state.resultUrls) URL.revokeObjectURL(url);
    state.resultUrls = [];
    state.seeds = [];
    $("results").replaceChildren();
    $("warnings").replaceChildren();
    $("warnings").hidden = true;
    $("seeds").textContent = "";
    $("progress").value = 0;
    clearPreview();
  }

  // Binary frame: [u8 version][u8 kind][u32 BE N][N bytes JSON header][image bytes]
  function parseFrame(buf) {
    const view = new DataView(buf);
    const kind = view.getUint8(1), n = view.getUint32(2, false);
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 6, n)));
    return { kind, header, blob: new Blob([new Uint8Array(buf, 6 + n)], { type: header.mime }) };
  }

  function onFrame(buf) {
    const { kind, header, blob } = parseFrame(buf);
    if (!state.job || header.job_id !== state.job) return;
    if (kind === 1) {
      if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
      state.previewUrl = URL.createObjectURL(blob);
      $("preview").src = state.previewUrl;
      $("preview").hidden = false;
    } else if (kind === 2) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      const url = URL.createObjectURL(blob);
      state.resultUrls.push(url);
      img.src = url;
      img.alt = "image " + header.index;
      const cap = document.createElement("figcaption");
      cap.textContent = "seed " + header.seed + " · " + header.width + "×" + header.height;
      fig.dataset.seed = header.seed;
      if (header.sha256) fig.dataset.sha256 = header.sha256;
      fig.append(img, cap);
      if (header.sha256) fig.append(editButtons(header.sha256, blob, state.resultUrls));
      $("results").append(fig);
    }
  }

  function seedsText() {
    return state.seeds.length ? (state.seeds.length > 1 ? "seeds " : "seed ") + state.seeds.join(", ") : "";
  }

  function finish(text, isError) {
    state.job = null;
    state.generateId = null;
    $("cancel").disabled = true;
    $("generate").disabled = !(state.ws && state.ws.readyState === WebSocket.OPEN);
    // The live preview belongs to the running job; the final images are in #results.
    clearPreview();
    status(text, isError);
  }

  function addWarning(m) {
    const li = document.createElement("li");
    li.textContent = (m.code ? m.code + ": " : "") + m.message;
    $("warnings").append(li);
    $("warnings").hidden = false;
  }

  function onMessage(m) {
    if (m.type === "hello") {
      $("who").textContent = "connected as " + m.principal;
      $("generate").disabled = state.job !== null;
      status("");  // whatever went wrong before this connection is no longer true
      return;
    }
    if (state.describeId && m.re === state.describeId) { onDescribe(m); return; }
    if (m.type === "error" && !m.job_id) {
      // A refused generate ends the submission; any other refused request (e.g. a cancel that came
      // too late) leaves the running job alone.
      const text = "error (" + m.code + "): " + m.message + (m.loc && m.loc.length ? " [at " + m.loc.join(".") + "]" : "");
      if (m.re !== undefined && m.re !== null && m.re === state.generateId) finish(text, true);
      else status(text, true);
      return;
    }
    if (m.type === "accepted") {
      if (m.re !== state.generateId) return;
      state.job = m.job_id;
      $("cancel").disabled = false;
      status(m.position > 0 ? "queued, position " + m.position : "starting");
      return;
    }
    if (!state.job || m.job_id !== state.job) return;
    switch (m.type) {
      case "queue": status("queued, position " + m.position); break;
      case "started":
        state.seeds = m.seeds.map(String);
        $("seeds").textContent = seedsText();
        status("running · " + seedsText());
        break;
      case "progress": {
        const done = m.image_index * m.total_steps + m.step, all = m.image_count * m.total_steps;
        $("progress").value = all ? done / all : 0;
        status(m.stage + " · image " + (m.image_index + 1) + "/" + m.image_count + " · step " + m.step + "/" + m.total_steps);
        break;
      }
      case "warning": addWarning(m); break;
      case "done": $("progress").value = 1; finish("done · " + m.images_done + " image(s)"); loadGallery(false); break;
      case "cancelled": {
        // A cancelled job's seeds are the only way to rerun what it was making.
        const seeds = seedsText();
        finish("cancelled · " + m.images_done + " image(s) finished" + (seeds ? " · " + seeds : " · not started"));
        break;
      }
      case "error": finish("failed (" + m.code + "): " + m.message, true); break;
    }
  }

  // Describe (Fooocus's image-to-prompt): the answer replaces the prompt and, with "apply styles"
  // (Fooocus's default), the styles, as Fooocus's Describe button does.
  function onDescribe(m) {
    if (m.type === "ack") { status("describing"); return; }
    state.describeId = null;
    $("describe").disabled = false;
    if (m.type === "describe_result") {
      $("prompt").value = m.prompt;
      if ($("describe-styles").checked) setStyles(m.styles.filter((name) => $("styles").querySelector(
        "option[value='" + CSS.escape(name) + "']")));
      status("described (" + m.mode + ")");
    } else if (m.type === "error") {
      status("describe failed (" + m.code + "): " + m.message, true);
    }
  }

  function describeInput() {
    if (!state.inputRef) { status("pick an input image first", true); return; }
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) { status("not connected", true); return; }
    state.describeId = "d" + Date.now();
    $("describe").disabled = true;
    state.ws.send(JSON.stringify({ type: "describe", id: state.describeId, image: state.inputRef,
                                   mode: $("describe-mode").value }));
  }

  function connect() {
    state.token = $("token").value.trim();
    if (!state.token) { status("enter the token", true); return; }
    sessionStorage.setItem("hooocus.token", state.token);
    if (state.ws) state.ws.close();
    // A job of the old connection sends nothing to the new one; forget it so Generate comes back.
    state.job = null;
    state.generateId = null;
    $("cancel").disabled = true;
    clearPreview();
    status("connecting");
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/ws";
    const ws = new WebSocket(url, ["hooocus.v1", "hooocus.token." + state.token]);
    ws.binaryType = "arraybuffer";
    // Every handler ignores a socket that has been replaced: the old one's close arrives after the
    // new one is up and must not report "disconnected" over a live connection.
    ws.onopen = () => ws.send(JSON.stringify({ type: "set_preview", max_side: 256, min_interval_ms: 100 }));
    ws.onmessage = (ev) => {
      if (state.ws !== ws) return;
      if (typeof ev.data === "string") onMessage(JSON.parse(ev.data)); else onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      $("generate").disabled = true;
      $("cancel").disabled = true;
      $("who").textContent = "";
      state.job = null;
      state.generateId = null;
      clearPreview();
      status("disconnected" + (ev.code ? " (" + ev.code + ")" : "") + "; check the token and connect again", true);
    };
    state.ws = ws;
    loadOptions().catch((e) => { if (state.ws === ws) status(String(e), true); });
  }

  // The seed as the decimal string the server gets, "" for a random one, or null when it is not a
  // whole number in [0, MAX_SEED]. Never Number(): "abc" would become NaN and "1e3" 1000.
  function readSeed() {
    const text = $("seed").value.trim();
    if (!text) return "";
    if (!/^\d+$/.test(text)) return null;
    const value = BigInt(text);
    return value <= MAX_SEED ? value.toString() : null;
  }

  function seedError(message) {
    $("seed-error").textContent = message;
    $("seed-error").hidden = !message;
    $("seed").setAttribute("aria-invalid", message ? "true" : "false");
  }

  // -- image input and mask -----------------------------------------------------------------------
  // "Vary / upscale / inpaint this" on a result or a gallery image: a generated image is a usable
  // reference for the principal that made it, so nothing is uploaded again.
  function editButtons(sha256, blob, urls) {
    const box = document.createElement("div");
    for (const [label, uov] of [["Vary (Subtle)", "Vary (Subtle)"], ["Vary (Strong)", "Vary (Strong)"],
                                ["Upscale (2x)", "Upscale (2x)"], ["Inpaint", "Disabled"]]) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "small edit-this";
      b.dataset.uov = uov;
      b.textContent = label;
      b.addEventListener("click", () => {
        setInput("sha256:" + sha256, blob);
        $("uov").value = uov;
        $("image-input").scrollIntoView({ block: "start" });
        status(uov === "Disabled" ? "paint the area to inpaint, then Generate" : uov + ": press Generate");
      });
      box.append(b);
    }
    const a = document.createElement("a");
    a.className = "download";
    a.textContent = "download";
    a.download = sha256.slice(0, 16) + "." + ((blob.type || "image/png").split("/")[1] || "png");
    a.href = URL.createObjectURL(blob);
    urls.push(a.href);  // revoked with the result or gallery view it belongs to
    box.append(" ", a);
    return box;
  }

  function setInput(ref, blob) {
    if (state.inputUrl) URL.revokeObjectURL(state.inputUrl);
    state.inputRef = ref;
    state.inputUrl = blob ? URL.createObjectURL(blob) : null;
    $("input-ref").textContent = ref ? "input image " + ref : "";
    $("image-clear").hidden = !ref;
    const img = $("input-preview");
    if (!state.inputUrl) {
      img.removeAttribute("src");
      $("canvas-wrap").hidden = true;
      return;
    }
    img.onload = () => {
      // The mask is painted at the image's own pixel size, whatever size it is shown at.
      const mask = $("mask");
      mask.width = img.naturalWidth;
      mask.height = img.naturalHeight;
      clearMask();
    };
    img.src = state.inputUrl;
    $("canvas-wrap").hidden = false;
  }

  async function upload(blob) {
    const res = await fetch("/v1/uploads", { method: "POST", headers: { ...auth(), "Content-Type": blob.type || "image/png" },
                                             body: blob });
    let body = null;
    try { body = await res.json(); } catch (e) { /* a non-JSON answer: reported by status below */ }
    if (!res.ok) {
      const err = body && body.error;
      throw new Error("upload failed (" + (err ? err.code + "): " + err.message : "HTTP " + res.status + ")"));
    }
    return "sha256:" + body.sha256;
  }

  async function pickInput(file) {
    if (!file) return;
    if (!state.token) { status("connect first", true); return; }
    status("uploading the image");
    try {
      setInput(await upload(file), file);
      status("image ready");
    } catch (e) {
      setInput(null, null);
      status(String(e.message || e), true);
    }
  }

  function clearMask() {
    const mask = $("mask");
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    state.maskPainted = false;
  }

  function invertMask() {
    const mask = $("mask"), ctx = mask.getContext("2d");
    const copy = document.createElement("canvas");
    copy.width = mask.width;
    copy.height = mask.height;
    const c = copy.getContext("2d");
    c.fillStyle = "#fff";
    c.fillRect(0, 0, copy.width, copy.height);
    c.globalCompositeOperation = "destination-out";
    c.drawImage(mask, 0, 0);
    ctx.clearRect(0, 0, mask.width, mask.height);
    ctx.drawImage(copy, 0, 0);
    state.maskPainted = true;
  }

  // Pointer painting: round white strokes (erase: cut them out); coordinates scaled from the shown
  // size to the image's pixels.
  function setupPainting() {
    const mask = $("mask");
    let last = null;
    const point = (ev) => {
      const r = mask.getBoundingClientRect();
      return [(ev.clientX - r.left) * mask.width / r.width, (ev.clientY - r.top) * mask.height / r.height];
    };
    const stroke = (from, to) => {
      const ctx = mask.getContext("2d");
      const scale = mask.width / mask.getBoundingClientRect().width;
      ctx.globalCompositeOperation = $("brush-erase").checked ? "destination-out" : "source-over";
      ctx.strokeStyle = ctx.fillStyle = "#fff";
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.lineWidth = Number($("brush-size").value) * scale;
      ctx.beginPath();
      ctx.moveTo(from[0], from[1]);
      ctx.lineTo(to[0] + 0.01, to[1]);
      ctx.stroke();
      state.maskPainted = true;
    };
    mask.addEventListener("pointerdown", (ev) => {
      mask.setPointerCapture(ev.pointerId);
      last = point(ev);
      stroke(last, last);
    });
    mask.addEventListener("pointermove", (ev) => {
      if (!last) return;
      const p = point(ev);
      stroke(last, p);
      last = p;
    });
    const end = () => { last = null; };
    mask.addEventListener("pointerup", end);
    mask.addEventListener("pointercancel", end);
  }

  // The painted mask as a PNG, white where painted on black (Fooocus reads channel 0, > 127 = inpaint),
  // or null when nothing is painted.
  async function maskPng() {
    const mask = $("mask");
    if (!state.maskPainted || !mask.width) return null;
    const alpha = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
    let any = false;
    for (let i = 3; i < alpha.length; i += 4) if (alpha[i] > 127) { any = true; break; }
    if (!any) return null;
    const out = document.createElement("canvas");
    out.width = mask.width;
    out.height = mask.height;
    const c = out.getContext("2d");
    c.fillStyle = "#000";
    c.fillRect(0, 0, out.width, out.height);
    c.drawImage(mask, 0, 0);
    return await new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }

  // -- metadata: an image's parameters into the form (POST /v1/parameters, the server's one parser) --
  async function loadParameters(file) {
    if (!file) return;
    if (!state.token) { status("connect first", true); return; }
    status("reading the image's parameters");
    try {
      const res = await fetch("/v1/parameters", { method: "POST", headers: { ...auth(), "Content-Type": file.type || "application/octet-stream" },
                                                  body: file });
      const body = await res.json();
      if (!res.ok) throw new Error("(" + body.error.code + "): " + body.error.message);
      applyParams(body.params);
      $("warnings").replaceChildren();
      $("warnings").hidden = true;
      for (const w of body.warnings || []) addWarning({ code: "parameters", message: w });
      status("parameters loaded from " + (file.name || "the image"));
    } catch (e) {
      status("cannot load parameters " + String(e.message || e), true);
    }
  }

  // -- gallery: this token's past jobs (GET /v1/jobs, newest first, paged) -------------------------
  async function fetchImage(url) {
    const res = await fetch(url, { headers: auth() });
    if (!res.ok) throw new Error("HTTP " + res.status);
    return await res.blob();
  }

  async function loadGallery(more) {
    if (!more) {
      for (const url of state.galleryUrls) URL.revokeObjectURL(url);
      state.galleryUrls = [];
      state.galleryBefore = null;
      $("gallery").replaceChildren();
    }
    const q = "?limit=12" + (more && state.galleryBefore ? "&before=" + encodeURIComponent(state.galleryBefore) : "");
    let page;
    try {
      const res = await fetch("/v1/jobs" + q, { headers: auth() });
      if (!res.ok) throw new Error("HTTP " + res.status);
      page = await res.json();
    } catch (e) {
      status("gallery: " + String(e.message || e), true);
      return;
    }
    state.galleryBefore = page.next_before;
    $("gallery-more").hidden = !page.next_before;
    for (const job of page.jobs) $("gallery").append(galleryEntry(job));
  }

  function galleryEntry(job) {
    const fig = document.createElement("figure");
    fig.dataset.jobId = job.job_id;
    const request = job.request || job.params || {};
    const cap = document.createElement("figcaption");
    cap.textContent = job.state + " · " + (request.prompt || "(no prompt)").slice(0, 80);
    const use = document.createElement("button");
    use.type = "button";
    use.className = "small use-params";
    use.textContent = "Use these parameters";
    // The job's own seed (the first image's), so the same image comes back.
    use.addEventListener("click", () => {
      applyParams(request, job.seeds && job.seeds.length ? job.seeds[0] : null);
      status("parameters of job " + job.job_id);
    });
    fig.append(cap, use);
    for (const image of job.images || []) {
      const box = document.createElement("div");
      box.className = "gallery-image";
      const img = document.createElement("img");
      img.alt = "seed " + image.seed;
      box.append(img);
      fig.append(box);
      fetchImage(image.url).then((blob) => {
        const url = URL.createObjectURL(blob);
        state.galleryUrls.push(url);
        img.src = url;
        box.append(editButtons(image.sha256, blob, state.galleryUrls));
      }).catch((e) => { img.alt = "image unavailable (" + e.message + ")"; });
    }
    return fig;
  }

  $("connect").addEventListener("click", connect);
  $("style-search").addEventListener("input", filterStyles);
  // One click toggles a style (no Ctrl needed): a picker, not a list selection.
  $("styles").addEventListener("mousedown", (ev) => {
    if (ev.target.tagName !== "OPTION") return;
    ev.preventDefault();
    ev.target.selected = !ev.target.selected;
    renderChips();
  });
  $("styles").addEventListener("change", renderChips);
  $("brush-size").addEventListener("input", () => { $("brush-size-value").textContent = $("brush-size").value; });
  $("mask-clear").addEventListener("click", clearMask);
  $("mask-invert").addEventListener("click", invertMask);
  $("image-clear").addEventListener("click", () => setInput(null, null));
  $("image-file").addEventListener("change", () => pickInput($("image-file").files[0]));
  $("params-file").addEventListener("change", () => loadParameters($("params-file").files[0]));
  $("gallery-refresh").addEventListener("click", () => loadGallery(false));
  $("gallery-more").addEventListener("click", () => loadGallery(true));
  // Drops: onto the input box = the input image; anywhere else = load that image's parameters.
  const imageFile = (ev) => Array.from(ev.dataTransfer ? ev.dataTransfer.files : []).find((f) => f.type.startsWith("image/"));
  $("image-drop").addEventListener("dragover", (ev) => { ev.preventDefault(); $("image-drop").classList.add("over"); });
  $("image-drop").addEventListener("dragleave", () => $("image-drop").classList.remove("over"));
  $("image-drop").addEventListener("drop", (ev) => {
    ev.preventDefault();
    ev.stopPropagation();
    $("image-drop").classList.remove("over");
    pickInput(imageFile(ev));
  });
  document.addEventListener("dragover", (ev) => ev.preventDefault());
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();
    loadParameters(imageFile(ev));
  });
  setupPainting();
  $("seed").addEventListener("input", () => seedError(""));
  $("form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (state.generateId) return;  // a submission (its uploads) is already under way
    const seed = readSeed();
    if (seed === null) {
      seedError("seed: a whole number from 0 to " + MAX_SEED + ", or empty for a random seed");
      $("seed").focus();
      return;
    }
    seedError("");
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) { status("not connected", true); return; }
    const params = {
      prompt: $("prompt").value,
      negative_prompt: $("negative").value,
      performance: $("performance").value || undefined,
      aspect_ratio: $("aspect").value || undefined,
      image_number: parseInt($("count").value, 10) || 1,
    };
    if (seed) params.seed = seed;
    const styles = selectedStyles();
    if (styles.length) params.styles = styles;
    if (!readAdvanced(params)) return;
    const outpaint = Array.from(document.querySelectorAll("input[name=outpaint]:checked"), (c) => c.value);
    const uov = $("uov").value;
    const id = "g" + Date.now();
    state.generateId = id;
    $("generate").disabled = true;
    if (state.inputRef) {
      params.input_image = state.inputRef;
      if (uov !== "Disabled") params.uov_method = uov;
      if (outpaint.length) params.outpaint_selections = outpaint;
      if ($("inpaint-mode").selectedIndex > 0) params.inpaint_mode = $("inpaint-mode").value;
      try {
        // Only when inpainting: with vary/upscale Fooocus ignores the mask, and an empty mask is none.
        const mask = uov === "Disabled" ? await maskPng() : null;
        if (mask) {
          status("uploading the mask");
          params.inpaint_mask = await upload(mask);
        }
      } catch (e) {
        state.generateId = null;
        $("generate").disabled = false;
        status(String(e.message || e), true);
        return;
      }
      if (state.generateId !== id || !state.ws || state.ws.readyState !== WebSocket.OPEN) {
        if (state.generateId === id) { state.generateId = null; status("not connected", true); }
        return;
      }
    }
    // Image Prompt slots (issue 16): each picked file is uploaded, then named by its sha256.
    const slots = Array.from(document.querySelectorAll(".ip-slot")).filter((row) => row.querySelector(".ip-file").files.length);
    if (slots.length) {
      try {
        status("uploading the image prompts");
        params.image_prompts = [];
        for (const row of slots) {
          const slot = { image: await upload(row.querySelector(".ip-file").files[0]), type: row.querySelector(".ip-type").value };
          const weight = row.querySelector(".ip-weight").value, stop = row.querySelector(".ip-stop").value;
          if (weight !== "") slot.weight = parseFloat(weight);
          if (stop !== "") slot.stop_at = parseFloat(stop);
          params.image_prompts.push(slot);
        }
      } catch (e) {
        state.generateId = null;
        $("generate").disabled = false;
        status(String(e.message || e), true);
        return;
      }
      if (state.generateId !== id || !state.ws || state.ws.readyState !== WebSocket.OPEN) {
        if (state.generateId === id) { state.generateId = null; status("not connected", true); }
        return;
      }
    }
    // Enhance (issue 16): the ticked panel becomes params.enhance; a tab needs a detection text (or a
    // rembg model, which finds its region without one). The server checks the values.
    if ($("enhance-on").checked) {
      const tabs = [];
      for (const row of document.querySelectorAll(".enh-tab")) {
        const detect = row.querySelector(".enh-detect").value.trim();
        const model = row.querySelector(".enh-mask-model").value;
        if (!detect && model === "sam") continue;
        const tab = { detection_prompt: detect, mask_model: model };
        const text = (cls) => row.querySelector(cls).value;
        if (text(".enh-prompt")) tab.prompt = text(".enh-prompt");
        if (text(".enh-negative")) tab.negative_prompt = text(".enh-negative");
        if (text(".enh-engine")) tab.inpaint_engine = text(".enh-engine");
        if (text(".enh-strength") !== "") tab.strength = parseFloat(text(".enh-strength"));
        if (text(".enh-respective") !== "") tab.respective_field = parseFloat(text(".enh-respective"));
        if (text(".enh-erode") !== "") tab.erode_or_dilate = parseInt(text(".enh-erode"), 10);
        if (row.querySelector(".enh-invert").checked) tab.invert = true;
        tabs.push(tab);
      }
      params.enhance = {
        tabs, uov_method: $("enhance-uov").value, uov_processing_order: $("enhance-uov-order").value,
        uov_prompt_type: $("enhance-uov-prompt").value, save_only_final: $("enhance-final-only").checked,
      };
    }
    clearJobView();
    status("submitting");
    state.ws.send(JSON.stringify({ type: "generate", id, params }));
  });
  $("describe").addEventListener("click", describeInput);
  $("cancel").addEventListener("click", () => {
    if (state.job && state.ws) state.ws.send(JSON.stringify({ type: "cancel", id: "c" + Date.now(), job_id: state.job }));
  });
  // The Enhance tabs: Fooocus's default_enhance_tabs (3) rows from one template, labelled "tab N ...".
  for (let i = 0; i < 3; i++) {
    const row = $("enh-tab-template").content.firstElementChild.cloneNode(true);
    row.dataset.tab = String(i);
    for (const el of row.querySelectorAll("[aria-label]")) {
      el.setAttribute("aria-label", `tab ${i + 1} ${el.getAttribute("aria-label")}`);
    }
    $("enh-tabs").append(row);
  }
  const saved = sessionStorage.getItem("hooocus.token");
  if (saved) $("token").value = saved;
})();
