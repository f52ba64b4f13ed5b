// tokserve playground: plain browser JavaScript, no build step, no dependencies.
// It uses the public HTTP API (docs/API.md) like any client:
//   GET /v1/models, GET /v1/classes                 what the server serves, ImageNet class names
//   POST /v1/encode (Accept: application/x-npy)     image -> tokens (B, L, D) float32 or int64 codes
//   POST /v1/decode (Content-Type: application/x-npy, Accept: image/png)   tokens -> reconstruction
//   POST /v1/jobs + GET /v1/jobs/{id}/events (SSE)  one generation job per sample, with step progress
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "tokserve-api-key";
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const page = {
    models: [], byName: new Map(), classNames: null, lastFile: null, reconRun: 0, modelsRun: 0, objectUrl: null,
    generatorShown: null,
  };

  // ------------------------------------------------------------------------------------------ HTTP + errors

  class ApiError extends Error {
    constructor(status, type, message, requestId) {
      super(message);
      this.status = status;
      this.type = type;
      this.requestId = requestId;
    }
  }

  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    const key = $("api-key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // An error answer as {status, type, message, request id}: the server's JSON error body when there is one
  // ({"error": {"type", "message", "request_id"}}), else the status line and the start of the body.
  async function apiError(r) {
    let type = "http_" + r.status;
    let message = r.statusText || "request failed";
    let requestId = r.headers.get("x-request-id");
    const text = await r.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && body.error) {
        type = body.error.type || type;
        message = body.error.message || message;
        requestId = body.error.request_id || requestId;
      } else if (body && body.detail) {
        message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      }
    } catch (_) {
      if (text) message = text.slice(0, 300);
    }
    return new ApiError(r.status, type, message, requestId);
  }

  async function api(path, opts) {
    opts = opts || {};
    let r;
    try {
      r = await fetch(path, Object.assign({}, opts, { headers: authHeaders(opts.headers) }));
    } catch (e) {
      throw new Error("could not reach the server (" + (e && e.message ? e.message : e) + ")");
    }
    if (!r.ok) throw await apiError(r);
    return r;
  }

  function describe(err) {
    if (err instanceof ApiError) {
      let s = err.status + " " + err.type + ": " + err.message;
      if (err.status === 401) s += "\nEnter the server's API key in the field at the top.";
      if (err.requestId) s += "\n(request id " + err.requestId + ")";
      return s;
    }
    return String(err && err.message ? err.message : err);
  }

  function showError(el, err) {
    el.textContent = typeof err === "string" ? err : describe(err);
    el.hidden = false;
  }

  function clearError(el) {
    el.hidden = true;
    el.textContent = "";
  }

  window.addEventListener("error", (e) => showError($("global-error"), "page error: " + (e.message || e)));
  window.addEventListener("unhandledrejection", (e) => showError($("global-error"), e.reason || "unknown error"));

  const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

  // ------------------------------------------------------------------------------------------ start-up

  async function waitReady() {
    const pill = $("server-status");
    for (;;) {
      try {
        const r = await fetch("/readyz");
        if (r.ok) {
          pill.textContent = "ready";
          pill.className = "pill ok";
          return;
        }
        const e = await apiError(r);
        pill.textContent = e.type + ": " + e.message;
      } catch (e) {
        pill.textContent = "server unreachable";
      }
      pill.className = "pill bad";
      await sleep(2000);
    }
  }

  async function loadModels() {
    const run = ++page.modelsRun; // a newer call (a new API key) wins
    const err = $("global-error");
    clearError(err);
    try {
      const info = await (await api("/v1/models")).json();
      let names = null;
      let namesError = null;
      try {
        const classes = await (await api("/v1/classes")).json();
        names = new Map(classes.classes.map((c) => [c.id, c.name]));
      } catch (e) {
        namesError = e;
      }
      if (run !== page.modelsRun) return;
      page.models = info.models;
      page.byName = new Map(info.models.map((m) => [m.name, m]));
      page.classNames = names;
      if (namesError) showError(err, "class names unavailable, showing ids only: " + describe(namesError));
      fillModelSelect($("tokenizer"), info.models.filter((m) => m.kind === "tokenizer"), info.default_tokenizer);
      fillModelSelect($("generator"), info.models.filter((m) => m.kind === "generator"), info.default_generator);
      onTokenizerChange();
      onGeneratorChange(false);
    } catch (e) {
      if (run === page.modelsRun) showError(err, e);
    }
  }

  function fillModelSelect(select, models, preferred) {
    const previous = select.value;
    select.replaceChildren();
    for (const m of models) {
      const label = m.name + " (" + m.family + (m.random_weights ? ", random weights" : "") + ")";
      select.append(new Option(label, m.name));
    }
    const names = models.map((m) => m.name);
    select.value = names.includes(previous) ? previous : names.includes(preferred) ? preferred : names[0] || "";
    select.disabled = models.length === 0;
  }

  // ------------------------------------------------------------------------------------------ .npy

  // A .npy file (format 1.0 - 3.0, C order) -> {shape, dtype, data}; data as numbers (int64 codes included).
  function parseNpy(buf) {
    const bytes = new Uint8Array(buf);
    const magic = String.fromCharCode(...bytes.slice(1, 6));
    if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("the server's answer is not a .npy file");
    const major = bytes[6];
    const view = new DataView(buf);
    const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
    const start = major === 1 ? 10 : 12;
    const header = new TextDecoder("latin1").decode(bytes.slice(start, start + headerLen));
    const descr = /'descr':\s*'([<>|=]?)([a-z])(\d+)'/.exec(header);
    const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header);
    if (!descr || !shapeText || /'fortran_order':\s*True/.test(header)) throw new Error("unexpected .npy header: " + header);
    const shape = shapeText[1].split(",").map((s) => s.trim()).filter((s) => s).map(Number);
    const count = shape.reduce((a, b) => a * b, 1);
    const little = descr[1] !== ">";
    const kind = descr[2];
    const size = Number(descr[3]);
    const offset = start + headerLen;
    const data = new Float64Array(count);
    for (let i = 0; i < count; i++) {
      const p = offset + i * size;
      if (kind === "f" && size === 4) data[i] = view.getFloat32(p, little);
      else if (kind === "f" && size === 8) data[i] = view.getFloat64(p, little);
      else if (kind === "i" && size === 8) data[i] = Number(view.getBigInt64(p, little));
      else if (kind === "i" && size === 4) data[i] = view.getInt32(p, little);
      else throw new Error("unsupported .npy dtype " + descr[0]);
    }
    const dtype = kind === "f" ? "float" + size * 8 : "int" + size * 8;
    return { shape, dtype, data };
  }

  // ------------------------------------------------------------------------------------------ preprocessing

  // The server's preprocessing (models/preprocess.py), in Pillow's own resampling arithmetic (Resample.c:
  // separable passes, horizontal first, 22-bit fixed-point coefficients, uint8 between passes), so that the
  // PSNR here compares the reconstruction with exactly the pixels the model saw.
  const PRECISION_BITS = 22;
  const FILTERS = {
    box: { support: 0.5, f: (x) => (x > -0.5 && x <= 0.5 ? 1 : 0) },
    bicubic: {
      support: 2,
      f: (x) => {
        const a = -0.5;
        x = Math.abs(x);
        if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
        if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
        return 0;
      },
    },
  };

  function coefficients(inSize, outSize, filter) {
    const scale = inSize / outSize;
    const filterScale = Math.max(scale, 1);
    const support = filter.support * filterScale;
    const ss = 1 / filterScale;
    const out = [];
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      const k = new Float64Array(xmax);
      let ww = 0;
      for (let x = 0; x < xmax; x++) {
        k[x] = filter.f((x + xmin - center + 0.5) * ss);
        ww += k[x];
      }
      const fixed = new Float64Array(xmax);
      for (let x = 0; x < xmax; x++) {
        const v = ww !== 0 ? k[x] / ww : k[x];
        fixed[x] = v < 0 ? Math.trunc(-0.5 + v * 2 ** PRECISION_BITS) : Math.trunc(0.5 + v * 2 ** PRECISION_BITS);
      }
      out.push({ xmin, k: fixed });
    }
    return out;
  }

  function clip8(v) {
    if (v >= 255 * 2 ** PRECISION_BITS) return 255;
    if (v <= 0) return 0;
    return Math.floor(v / 2 ** PRECISION_BITS);
  }

  // img: {w, h, rgb: Uint8Array(w * h * 3)} -> the same at (w2, h2)
  function resample(img, w2, h2, filter) {
    if (w2 !== img.w) {
      const cs = coefficients(img.w, w2, filter);
      const out = new Uint8Array(w2 * img.h * 3);
      for (let y = 0; y < img.h; y++) {
        for (let xx = 0; xx < w2; xx++) {
          const { xmin, k } = cs[xx];
          for (let c = 0; c < 3; c++) {
            let s = 2 ** (PRECISION_BITS - 1);
            for (let x = 0; x < k.length; x++) s += img.rgb[(y * img.w + xmin + x) * 3 + c] * k[x];
            out[(y * w2 + xx) * 3 + c] = clip8(s);
          }
        }
      }
      img = { w: w2, h: img.h, rgb: out };
    }
    if (h2 !== img.h) {
      const cs = coefficients(img.h, h2, filter);
      const out = new Uint8Array(img.w * h2 * 3);
      for (let yy = 0; yy < h2; yy++) {
        const { xmin: ymin, k } = cs[yy];
        for (let x = 0; x < img.w; x++) {
          for (let c = 0; c < 3; c++) {
            let s = 2 ** (PRECISION_BITS - 1);
            for (let y = 0; y < k.length; y++) s += img.rgb[((ymin + y) * img.w + x) * 3 + c] * k[y];
            out[(yy * img.w + x) * 3 + c] = clip8(s);
          }
        }
      }
      img = { w: img.w, h: h2, rgb: out };
    }
    return img;
  }

  function pyRound(x) { // Python's round(): halves to even
    const f = Math.floor(x);
    const d = x - f;
    if (d !== 0.5) return d > 0.5 ? f + 1 : f;
    return f % 2 === 0 ? f : f + 1;
  }

  function preprocess(img, size, mode) {
    if (mode === "resize") return resample(img, size, size, FILTERS.bicubic);
    while (Math.min(img.w, img.h) >= 2 * size) {
      img = resample(img, Math.floor(img.w / 2), Math.floor(img.h / 2), FILTERS.box);
    }
    const scale = size / Math.min(img.w, img.h);
    img = resample(img, pyRound(img.w * scale), pyRound(img.h * scale), FILTERS.bicubic);
    const top = Math.floor((img.h - size) / 2);
    const left = Math.floor((img.w - size) / 2);
    const rgb = new Uint8Array(size * size * 3);
    for (let y = 0; y < size; y++) {
      const from = ((top + y) * img.w + left) * 3;
      rgb.set(img.rgb.subarray(from, from + size * 3), y * size * 3);
    }
    return { w: size, h: size, rgb };
  }

  // A file or blob -> {w, h, rgb}: decoded by the browser without colour management (as Pillow reads it),
  // alpha composited over white (as the server does).
  async function readPixels(blob) {
    const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const canvas = document.createElement("canvas");
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const rgb = new Uint8Array(canvas.width * canvas.height * 3);
    for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
      rgb[j] = rgba[i];
      rgb[j + 1] = rgba[i + 1];
      rgb[j + 2] = rgba[i + 2];
    }
    return { w: canvas.width, h: canvas.height, rgb };
  }

  function drawRGB(canvas, img) {
    canvas.width = img.w;
    canvas.height = img.h;
    const ctx = canvas.getContext("2d");
    const data = ctx.createImageData(img.w, img.h);
    for (let i = 0, j = 0; j < img.rgb.length; i += 4, j += 3) {
      data.data[i] = img.rgb[j];
      data.data[i + 1] = img.rgb[j + 1];
      data.data[i + 2] = img.rgb[j + 2];
      data.data[i + 3] = 255;
    }
    ctx.putImageData(data, 0, 0);
  }

  function psnr(a, b) {
    if (a.w !== b.w || a.h !== b.h) throw new Error(`sizes differ: ${a.w}x${a.h} and ${b.w}x${b.h}`);
    let se = 0;
    for (let i = 0; i < a.rgb.length; i++) {
      const d = a.rgb[i] - b.rgb[i];
      se += d * d;
    }
    const mse = se / a.rgb.length;
    return mse === 0 ? Infinity : 10 * Math.log10((255 * 255) / mse);
  }

  // ------------------------------------------------------------------------------------------ heatmap

  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const DIVERGING = [[33, 102, 172], [247, 247, 247], [178, 24, 43]];

  function ramp(stops, t) {
    t = Math.min(1, Math.max(0, t)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(t));
    const f = t - i;
    return stops[i].map((v, c) => Math.round(v + (stops[i + 1][c] - v) * f));
  }

  // Rectangles {x, y, w, h, i} (i: index into one image's flat values) laying the token array out:
  //   tokens (L, D): one column per token, one row per dim (tokens across, dims down);
  //   multi-scale codes ((G,) sum of p*p): per branch a row of p x p squares, coarse to fine, equal size;
  //   other codes (G, L): G rows of L; (L): wrapped row-major into a near-square grid.
  function heatmapLayout(one, discrete, spec) {
    const cs = spec.code_structure || {};
    const rects = [];
    const count = one.reduce((a, b) => a * b, 1);
    const scales = cs.scales || [];
    const perBranch = scales.reduce((a, p) => a + p * p, 0);
    if (discrete && scales.length && perBranch === one[one.length - 1]) {
      const branches = one.length === 2 ? one[0] : 1;
      const side = 64;
      const gap = 8;
      for (let b = 0; b < branches; b++) {
        let x0 = 0;
        let offset = b * perBranch;
        for (const p of scales) {
          const y0 = b * (side + gap);
          for (let r = 0; r < p; r++) {
            for (let c = 0; c < p; c++) {
              const x = x0 + Math.round((c * side) / p);
              const y = y0 + Math.round((r * side) / p);
              rects.push({ x, y, w: x0 + Math.round(((c + 1) * side) / p) - x,
                           h: y0 + Math.round(((r + 1) * side) / p) - y, i: offset + r * p + c });
            }
          }
          offset += p * p;
          x0 += side + gap;
        }
      }
      const desc = `${branches > 1 ? branches + " branches x " : ""}scales ${scales.join(", ")} (coarse to fine)`;
      return { rects, width: scales.length * (side + gap) - gap, height: branches * (side + gap) - gap, desc };
    }
    let rows;
    let cols;
    let at;
    let desc;
    if (!discrete && one.length === 2) {
      const [L, D] = one;
      rows = D;
      cols = L;
      at = (r, c) => c * D + r; // value of token c, dim r
      desc = `${L} tokens across x ${D} dims down`;
    } else if (one.length === 1) {
      cols = Math.ceil(Math.sqrt(count));
      rows = Math.ceil(count / cols);
      at = (r, c) => r * cols + c;
      desc = `${count} codes, wrapped into ${rows} rows of ${cols}`;
    } else {
      rows = one[0];
      cols = count / rows;
      at = (r, c) => r * cols + c;
      desc = `${rows} rows x ${cols} codes`;
    }
    const cell = Math.max(1, Math.floor(Math.min(512 / cols, 256 / rows)));
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) rects.push({ x: c * cell, y: r * cell, w: cell, h: cell, i: at(r, c) });
    }
    return { rects, width: cols * cell, height: rows * cell, desc };
  }

  // The token array of one image as a heatmap: tokens on a diverging scale symmetric about 0 (blue, white,
  // red; the limit is the 99th percentile of |value|), integer codes on viridis over the codebook.
  function drawHeatmap(canvas, t, spec) {
    const one = t.shape.slice(1);
    const discrete = t.dtype.startsWith("int");
    const count = one.reduce((a, b) => a * b, 1);
    const values = t.data.subarray(0, count);
    let lo;
    let hi;
    let legend;
    if (discrete) {
      const size = spec.code_structure && spec.code_structure.codebook_size;
      lo = 0;
      hi = size ? size - 1 : Math.max(...values);
      legend = `colour: code 0 (purple) to ${hi} (yellow)`;
    } else {
      const mags = Array.from(values, Math.abs).sort((a, b) => a - b);
      const lim = mags[Math.floor(0.99 * (mags.length - 1))] || 1;
      lo = -lim;
      hi = lim;
      legend = `colour: ${(-lim).toFixed(2)} (blue) .. 0 (white) .. +${lim.toFixed(2)} (red)`;
    }
    const layout = heatmapLayout(one, discrete, spec);
    canvas.width = layout.width;
    canvas.height = layout.height;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    for (const r of layout.rects) {
      if (r.i >= values.length) continue;
      const rgb = ramp(discrete ? VIRIDIS : DIVERGING, (values[r.i] - lo) / (hi - lo || 1));
      ctx.fillStyle = `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
      ctx.fillRect(r.x, r.y, r.w, r.h);
    }
    const what = discrete ? "codes" : "tokens";
    $("token-shape").textContent = `${what} (${t.shape.join(", ")}) ${t.dtype}: ${layout.desc}`;
    $("heatmap-scale").textContent = legend;
  }

  // ------------------------------------------------------------------------------------------ reconstruct

  function onTokenizerChange() {
    const spec = page.byName.get($("tokenizer").value);
    $("tokenizer-info").textContent = spec
      ? `${spec.image_size}x${spec.image_size} px, ${spec.token_dtype === "int64" ? "codes" : "tokens"} ` +
        `[${spec.token_shape.join(", ")}] ${spec.token_dtype}` + (spec.random_weights ? ", random weights" : "")
      : "";
    if (page.lastFile && spec) reconstruct(page.lastFile);
  }

  async function reconstruct(file) {
    const run = ++page.reconRun;
    const spec = page.byName.get($("tokenizer").value);
    const results = $("recon-results");
    const status = $("recon-status");
    clearError($("recon-error"));
    if (!spec) {
      showError($("recon-error"), "no tokenizer is loaded (see the error above)");
      return;
    }
    page.lastFile = file;
    const mode = $("preprocess").value;
    results.dataset.state = "running";
    status.textContent = `encoding ${file.name || "the image"} with ${spec.name}...`;
    try {
      const form = new FormData();
      form.append("image", file, file.name || "image");
      const q = new URLSearchParams({ model: spec.name, preprocess: mode });
      const t0 = performance.now();
      const enc = await api("/v1/encode?" + q, { method: "POST", body: form, headers: { Accept: "application/x-npy" } });
      const npy = await enc.arrayBuffer();
      const tokens = parseNpy(npy);
      status.textContent = "decoding...";
      const dec = await api("/v1/decode?" + new URLSearchParams({ model: spec.name, format: "png" }), {
        method: "POST", body: npy, headers: { "Content-Type": "application/x-npy", Accept: "image/png" },
      });
      const png = await dec.blob();
      const ms = performance.now() - t0;
      if (run !== page.reconRun) return; // a newer upload or model choice took over
      const size = spec.image_size;
      const original = preprocess(await readPixels(file), size, mode);
      const recon = await readPixels(png);
      drawRGB($("orig-canvas"), original);
      $("orig-caption").textContent = `original (${mode}, ${size}x${size})`;
      if (page.objectUrl) URL.revokeObjectURL(page.objectUrl);
      page.objectUrl = URL.createObjectURL(png);
      const img = $("recon-img");
      img.src = page.objectUrl;
      await img.decode();
      const db = psnr(original, recon);
      const psnrEl = $("psnr");
      psnrEl.dataset.psnr = String(db);
      psnrEl.textContent = Number.isFinite(db) ? `PSNR ${db.toFixed(2)} dB` : "PSNR inf (identical)";
      drawHeatmap($("heatmap"), tokens, spec);
      results.hidden = false;
      results.dataset.state = "done";
      status.textContent = `${spec.name}: encode + decode in ${ms.toFixed(0)} ms ` +
        `(server compute ${dec.headers.get("x-compute-time") || "?"} ms for the decode)`;
    } catch (e) {
      if (run !== page.reconRun) return;
      results.dataset.state = "error";
      status.textContent = "";
      showError($("recon-error"), e);
    }
  }

  function wireDropZone() {
    const zone = $("drop-zone");
    const input = $("file-input");
    input.addEventListener("change", () => {
      if (input.files && input.files[0]) reconstruct(input.files[0]);
      input.value = "";
    });
    zone.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        input.click();
      }
    });
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (e) => {
        e.preventDefault();
        zone.classList.add("over");
      });
    }
    for (const type of ["dragleave", "drop"]) zone.addEventListener(type, () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      const file = e.dataTransfer && e.dataTransfer.files[0];
      if (file) reconstruct(file);
    });
  }

  // ------------------------------------------------------------------------------------------ generate

  function className(id) {
    const name = page.classNames && page.classNames.get(id);
    return name ? `${id} ${name}` : String(id);
  }

  // A new generator: its classes, samplers and defaults; the same one again (models reloaded): keep what the
  // user typed, refresh the class names.
  function onGeneratorChange(chosen) {
    const spec = page.byName.get($("generator").value);
    const classSelect = $("class-id");
    const samplerSelect = $("sampler");
    const same = chosen === false && spec && page.generatorShown === spec.name;
    const keep = { cls: classSelect.value, sampler: samplerSelect.value };
    page.generatorShown = spec ? spec.name : null;
    classSelect.replaceChildren();
    samplerSelect.replaceChildren();
    $("gen-button").disabled = !spec;
    if (!spec) {
      $("gen-info").textContent = "no generator is loaded";
      return;
    }
    const ids = spec.classes || [];
    for (const id of ids) classSelect.append(new Option(className(id), String(id)));
    if (ids.includes(207)) classSelect.value = "207"; // golden retriever, when served
    for (const s of spec.samplers || []) samplerSelect.append(new Option(s, s));
    if (same) {
      classSelect.value = keep.cls;
      samplerSelect.value = keep.sampler;
      return;
    }
    const d = spec.defaults || {};
    if (d.sampler) samplerSelect.value = d.sampler;
    $("cfg-scale").value = d.cfg_scale !== undefined ? d.cfg_scale : "";
    $("steps").value = d.steps !== undefined ? d.steps : "";
    $("gen-info").textContent = `${spec.family}, ${spec.image_size}x${spec.image_size} px, ${ids.length} classes, ` +
      `decoded by ${spec.tokenizer}` + (spec.random_weights ? " (random weights: samples are noise)" : "");
  }

  function makeCell(seed) {
    const cell = document.createElement("div");
    cell.className = "cell";
    cell.dataset.state = "submitting";
    const frame = document.createElement("div");
    frame.className = "frame";
    const bar = document.createElement("progress");
    frame.append(bar);
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = `seed ${seed}: submitting`;
    cell.append(frame, caption);
    $("grid").append(cell);
    return {
      el: cell,
      status(text) {
        caption.textContent = `seed ${seed}: ${text}`;
      },
      progress(step, steps) {
        bar.max = steps;
        bar.value = step;
        caption.textContent = `seed ${seed}: step ${step} / ${steps}`;
      },
      done(src) {
        const img = document.createElement("img");
        img.alt = `sample, seed ${seed}`;
        img.src = src;
        frame.replaceChildren(img);
        caption.textContent = `seed ${seed}`;
        cell.dataset.state = "done";
      },
      fail(text) {
        cell.classList.add("failed");
        frame.replaceChildren(document.createTextNode(text));
        caption.textContent = `seed ${seed}: failed`;
        cell.dataset.state = "failed";
      },
    };
  }

  // Follow a job's server-sent events through fetch (so the API key header goes along); reconnects with
  // Last-Event-ID if the stream ends early. Returns the terminal event {type, data}.
  async function followEvents(url, onEvent) {
    let last = null;
    for (let attempt = 0; attempt < 5; attempt++) {
      const headers = { Accept: "text/event-stream" };
      if (last) headers["Last-Event-ID"] = last;
      const r = await api(url, { headers });
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          let id = null;
          let type = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith(":")) continue; // keep-alive comment
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "id") id = val;
            else if (field === "event") type = val;
            else if (field === "data") data.push(val);
          }
          if (!data.length) continue;
          if (id !== null) last = id;
          const payload = JSON.parse(data.join("\n"));
          onEvent(type, payload);
          if (TERMINAL.has(type)) {
            reader.cancel().catch(() => {});
            return { type, data: payload };
          }
        }
      }
      await sleep(500);
    }
    throw new Error("the job's event stream ended before the job finished");
  }

  async function runSample(cell, body) {
    try {
      const job = await (await api("/v1/jobs", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      })).json();
      cell.status("queued");
      const end = await followEvents(job.links.events, (type, data) => {
        if (type === "started") cell.status("running");
        else if (type === "queued") cell.status(data.reason ? `queued again (${data.reason})` : "queued");
        else if (type === "step") cell.progress(data.step, data.steps);
      });
      if (end.type === "failed") {
        const e = end.data.error || {};
        throw new Error(`${e.type || "failed"}: ${e.message || "the job failed"}`);
      }
      if (end.type === "cancelled") throw new Error("the job was cancelled");
      const info = await (await api(job.links.self)).json();
      const image = info.result && info.result.images && info.result.images[0];
      if (!image) throw new Error("the completed job has no image");
      cell.done(`data:image/${image.format || "png"};base64,${image.data}`);
    } catch (e) {
      cell.fail(describe(e));
      showError($("gen-error"), e);
    }
  }

  async function generate() {
    const spec = page.byName.get($("generator").value);
    if (!spec) return;
    clearError($("gen-error"));
    const button = $("gen-button");
    const n = Math.max(1, Math.min(16, parseInt($("num-samples").value, 10) || 1));
    let seed = parseInt($("seed").value, 10);
    if (!Number.isFinite(seed) || seed < 0) {
      seed = Math.floor(Math.random() * 1e9);
      $("seed").value = seed;
    }
    const classId = parseInt($("class-id").value, 10);
    const common = { op: "generate", model: spec.name, class: classId, num_images: 1, format: "png" };
    const cfg = parseFloat($("cfg-scale").value);
    if (Number.isFinite(cfg)) common.cfg_scale = cfg;
    const steps = parseInt($("steps").value, 10);
    if (Number.isFinite(steps)) common.steps = steps;
    if ($("sampler").value) common.sampler = $("sampler").value;
    $("grid").replaceChildren();
    $("grid").dataset.state = "running";
    button.disabled = true;
    const t0 = performance.now();
    $("gen-info").textContent = `${n} sample(s) of class ${className(classId)}, seeds ${seed}..${seed + n - 1}`;
    try {
      const cells = [];
      for (let i = 0; i < n; i++) cells.push([makeCell(seed + i), Object.assign({ seed: seed + i }, common)]);
      await Promise.all(cells.map(([cell, body]) => runSample(cell, body)));
      const ok = cells.filter(([cell]) => cell.el.dataset.state === "done").length;
      $("gen-info").textContent = `${ok} of ${n} sample(s) of class ${className(classId)} in ` +
        `${((performance.now() - t0) / 1000).toFixed(1)} s (one job per sample, batched by the server)`;
    } finally {
      $("grid").dataset.state = "done";
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------------------------------ wiring

  async function main() {
    const key = $("api-key");
    key.value = localStorage.getItem(KEY_STORAGE) || "";
    key.addEventListener("change", () => {
      localStorage.setItem(KEY_STORAGE, key.value.trim());
      loadModels();
    });
    $("tokenizer").addEventListener("change", onTokenizerChange);
    $("preprocess").addEventListener("change", onTokenizerChange);
    $("generator").addEventListener("change", () => onGeneratorChange(true));
    $("gen-button").addEventListener("click", generate);
    wireDropZone();
    await waitReady();
    await loadModels();
    document.body.dataset.ready = "true";
  }

  main();
})();
