// Hooocus page: a hooocus.v1 websocket client with no build step. See docs/protocol.md.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const state = { ws: null, token: "", job: null, pendingImages: new Map(), previewUrl: null };

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
    fill($("styles"), o.styles || [], null);
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
    } else if (kind === 2) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = URL.createObjectURL(blob);
      img.alt = "image " + header.index;
      const cap = document.createElement("figcaption");
      cap.textContent = "seed " + header.seed + " · " + header.width + "×" + header.height;
      fig.dataset.seed = header.seed;
      fig.append(img, cap);
      $("results").append(fig);
    }
  }

  function finish(text, isError) {
    state.job = null;
    $("cancel").disabled = true;
    $("generate").disabled = false;
    status(text, isError);
  }

  function onMessage(m) {
    if (m.type === "hello") {
      $("who").textContent = "connected as " + m.principal;
      $("generate").disabled = false;
      return;
    }
    if (m.type === "error" && (m.re !== undefined && m.re !== null) && !m.job_id) {
      finish("error (" + m.code + "): " + m.message, true);
      return;
    }
    if (m.type === "accepted") {
      state.job = m.job_id;
      $("cancel").disabled = false;
      status(m.position > 0 ? "queued, position " + m.position : "starting");
      return;
    }
    if (!state.job || m.job_id !== state.job) return;
    switch (m.type) {
      case "queue": status("queued, position " + m.position); break;
      case "started": status("running · seeds " + m.seeds.join(", ")); break;
      case "progress": {
        const done = m.image_index * m.total_steps + m.step, all = m.image_count * m.total_steps;
        $("progress").value = all ? done / all : 0;
        status(m.stage + " · image " + (m.image_index + 1) + "/" + m.image_count + " · step " + m.step + "/" + m.total_steps);
        break;
      }
      case "done": $("progress").value = 1; finish("done · " + m.images_done + " image(s)"); break;
      case "cancelled": finish("cancelled · " + m.images_done + " image(s) finished"); break;
      case "error": finish("failed (" + m.code + "): " + m.message, true); break;
    }
  }

  function connect() {
    state.token = $("token").value.trim();
    if (!state.token) { status("enter the token", true); return; }
    sessionStorage.setItem("hooocus.token", state.token);
    if (state.ws) state.ws.close();
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/ws";
    const ws = new WebSocket(url, ["hooocus.v1", "hooocus.token." + state.token]);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => ws.send(JSON.stringify({ type: "set_preview", max_side: 256, min_interval_ms: 100 }));
    ws.onmessage = (ev) => (typeof ev.data === "string" ? onMessage(JSON.parse(ev.data)) : onFrame(ev.data));
    ws.onclose = (ev) => {
      $("generate").disabled = true;
      $("who").textContent = "";
      status("disconnected" + (ev.code ? " (" + ev.code + ")" : "") + "; check the token and connect again", true);
    };
    state.ws = ws;
    loadOptions().catch((e) => status(String(e), true));
  }

  $("connect").addEventListener("click", connect);
  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) { status("not connected", true); return; }
    const params = {
      prompt: $("prompt").value,
      negative_prompt: $("negative").value,
      performance: $("performance").value || undefined,
      aspect_ratio: $("aspect").value || undefined,
      image_number: parseInt($("count").value, 10) || 1,
    };
    const seed = $("seed").value.trim();
    if (seed) params.seed = /^\d+$/.test(seed) ? seed : Number(seed); // digits as a string: seeds go to 2^63
    const styles = Array.from($("styles").selectedOptions, (o) => o.value);
    if (styles.length) params.styles = styles;
    $("results").replaceChildren();
    $("progress").value = 0;
    $("generate").disabled = true;
    status("submitting");
    state.ws.send(JSON.stringify({ type: "generate", id: "g" + Date.now(), params }));
  });
  $("cancel").addEventListener("click", () => {
    if (state.job && state.ws) state.ws.send(JSON.stringify({ type: "cancel", id: "c" + Date.now(), job_id: state.job }));
  });
  const saved = sessionStorage.getItem("hooocus.token");
  if (saved) $("token").value = saved;
})();
