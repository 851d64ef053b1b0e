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
  };

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
      fig.append(img, cap);
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
      case "done": $("progress").value = 1; finish("done · " + m.images_done + " image(s)"); break;
      case "cancelled": {
        // A cancelled job's seeds are the only way to rerun what it was making.
        const seeds = seedsText();
        finish("cancelled · " + m.images_done + " image(s) finished" + (seeds ? " · " + seeds : " · not started"));
        break;
      }
      case "error": finish("failed (" + m.code + "): " + m.message, true); break;
    }
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

  $("connect").addEventListener("click", connect);
  $("seed").addEventListener("input", () => seedError(""));
  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
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
    const styles = Array.from($("styles").selectedOptions, (o) => o.value);
    if (styles.length) params.styles = styles;
    clearJobView();
    $("generate").disabled = true;
    status("submitting");
    state.generateId = "g" + Date.now();
    state.ws.send(JSON.stringify({ type: "generate", id: state.generateId, params }));
  });
  $("cancel").addEventListener("click", () => {
    if (state.job && state.ws) state.ws.send(JSON.stringify({ type: "cancel", id: "c" + Date.now(), job_id: state.job }));
  });
  const saved = sessionStorage.getItem("hooocus.token");
  if (saved) $("token").value = saved;
})();
