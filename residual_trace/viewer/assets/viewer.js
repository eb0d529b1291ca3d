/* residual-trace viewer: token x token maps you can point at. No network, no libraries.
 *
 * Every view's data sits in a <script type="application/json" class="rt-data"> beside its
 * <section class="rt-view">. Arrays come quantised: {shape, lo, hi, bits, z} where z is the
 * base64 of the gzip of little-endian unsigned integers; the largest code means "no value"
 * (NaN in the CSV) and code k means lo + k * (hi - lo) / (largest code - 1).
 */
(function () {
  "use strict";

  // -- decoding ---------------------------------------------------------------------------
  function bytesOf(b64) {
    const text = atob(b64);
    const out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return out;
  }

  async function gunzip(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  async function decode(packed) {
    const raw = await gunzip(bytesOf(packed.z));
    const view = new DataView(raw.buffer);
    const size = packed.shape.reduce((a, b) => a * b, 1);
    const values = new Float64Array(size);
    const top = packed.bits === 16 ? 65535 : 255;
    const step = (packed.hi - packed.lo) / (top - 1);
    for (let i = 0; i < size; i++) {
      const code = packed.bits === 16 ? view.getUint16(2 * i, true) : raw[i];
      values[i] = code === top ? NaN : packed.lo + code * step;
    }
    return { shape: packed.shape, values: values, step: step };
  }

  async function decodeAll(items) {
    // every {..., arr: packed} item gets .map = decoded
    await Promise.all(items.map(async (item) => { item.map = await decode(item.arr); }));
    return items;
  }

  // -- formatting and colour ---------------------------------------------------------------
  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "n/a";
    if (typeof value !== "number") return String(value);
    const d = digits === undefined ? 4 : digits;
    if (value !== 0 && Math.abs(value) < Math.pow(10, -d)) return value.toExponential(1);
    return value.toFixed(d);
  }

  const VIRIDIS = ["#440154", "#472c7a", "#3b518b", "#2c718e", "#21908d", "#27ad81",
    "#5cc863", "#aadc32", "#fde725"];
  const RDBU = ["#2166ac", "#67a9cf", "#d1e5f0", "#f7f7f7", "#fddbc7", "#ef8a62", "#b2182b"];

  function hexToRgb(hex) {
    return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  }

  function ramp(stops, t) {
    t = Math.min(1, Math.max(0, t));
    const x = t * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(x));
    const a = hexToRgb(stops[i]), b = hexToRgb(stops[i + 1]);
    const f = x - i;
    return "rgb(" + a.map((v, k) => Math.round(v + f * (b[k] - v))).join(",") + ")";
  }

  // scale: {kind: "seq", lo, hi} or {kind: "div", lo, hi} (centred at 0)
  function colour(scale, value) {
    if (Number.isNaN(value)) return "#d9d9d9";
    if (scale.kind === "div") {
      if (value >= 0) return ramp(RDBU, 0.5 + 0.5 * (scale.hi > 0 ? value / scale.hi : 0));
      return ramp(RDBU, 0.5 - 0.5 * (scale.lo < 0 ? value / scale.lo : 0));
    }
    const span = scale.hi - scale.lo || 1;
    return ramp(VIRIDIS, (value - scale.lo) / span);
  }

  function textColour(scale, value) {
    if (Number.isNaN(value)) return "#333";
    if (scale.kind === "div") return "#111";
    return (value - scale.lo) / (scale.hi - scale.lo || 1) > 0.6 ? "#111" : "#fff";
  }

  // -- SVG heatmap (markup parsed by the HTML parser: no namespace, one listener per map) --
  function esc(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;");
  }

  function html(tag, attrs, parent, text) {
    const node = document.createElement(tag);
    for (const key in attrs || {}) node.setAttribute(key, attrs[key]);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  /* spec: {rows, cols, values (row-major), rowLabels, colLabels, rowTitle, colTitle, scale,
   *        cellText (optional array of strings), hover(r, c) -> string, click(r, c) optional,
   *        clickRow(r) optional, cell, cellW (px), name} */
  function heatmap(container, spec, tip) {
    container.innerHTML = "";
    const cell = spec.cell || Math.max(6, Math.min(26, Math.floor(560 / Math.max(spec.rows, spec.cols))));
    const cellW = spec.cellW || cell;
    const labelW = 8 + 6.5 * Math.min(16, Math.max(...spec.rowLabels.map((s) => s.length), 1));
    const labelH = 8 + 6.5 * Math.min(16, Math.max(...spec.colLabels.map((s) => s.length), 1));
    // labels at least a line apart: rows 11 px, slanted columns 13 px across their slant
    const everyR = Math.max(1, Math.ceil(11 / cell)), everyC = Math.max(1, Math.ceil(13 / (0.87 * cellW)));
    const width = labelW + 20 + spec.cols * cellW + 10, height = labelH + 20 + spec.rows * cell + 10;
    const x0 = labelW + 20, y0 = 10, midY = y0 + (spec.rows * cell) / 2;
    const parts = [];
    let signature = 0;
    for (let r = 0; r < spec.rows; r++) {
      for (let c = 0; c < spec.cols; c++) {
        const v = spec.values[r * spec.cols + c];
        if (!Number.isNaN(v)) signature = (signature * 31 + Math.round(v * 1e4) + r * 7 + c) % 1000000007;
        parts.push('<rect class="rt-cell" data-r="' + r + '" data-c="' + c + '" x="' + (x0 + c * cellW) +
          '" y="' + (y0 + r * cell) + '" width="' + cellW + '" height="' + cell + '" fill="' +
          colour(spec.scale, v) + '"></rect>');
        if (spec.cellText && cell >= 12) {
          parts.push('<text class="rt-celltext" text-anchor="middle" x="' + (x0 + c * cellW + cellW / 2) +
            '" y="' + (y0 + r * cell + cell * 0.68) + '" fill="' + textColour(spec.scale, v) + '">' +
            esc(spec.cellText[r * spec.cols + c]) + "</text>");
        }
      }
    }
    parts.push('<text class="rt-axis" text-anchor="middle" x="12" y="' + midY + '" transform="rotate(-90 12 ' +
      midY + ')">' + esc(spec.rowTitle || "") + "</text>");
    parts.push('<text class="rt-axis" text-anchor="middle" x="' + (x0 + (spec.cols * cellW) / 2) + '" y="' +
      (height - 4) + '">' + esc(spec.colTitle || "") + "</text>");
    spec.rowLabels.forEach((label, r) => {
      if (r % everyR) return;
      parts.push('<text class="rt-label' + (spec.clickRow ? " rt-click" : "") + '" data-row="' + r +
        '" text-anchor="end" x="' + (x0 - 4) + '" y="' + (y0 + r * cell + cell / 2 + 4) + '">' + esc(label) + "</text>");
    });
    spec.colLabels.forEach((label, c) => {
      if (c % everyC) return;
      const x = x0 + c * cellW + cellW / 2 + 4, y = y0 + spec.rows * cell + 6;
      parts.push('<text class="rt-label" text-anchor="end" x="' + x + '" y="' + y + '" transform="rotate(-60 ' +
        x + " " + y + ')">' + esc(label) + "</text>");
    });
    container.insertAdjacentHTML("beforeend", '<svg class="rt-map" width="' + width + '" height="' + height +
      '" data-name="' + esc(spec.name || "") + '" data-signature="' + signature + ":" + spec.rows + "x" + spec.cols +
      '">' + parts.join("") + "</svg>");
    const svg = container.lastElementChild;
    svg.addEventListener("mousemove", (event) => {
      const t = event.target;
      if (t.classList.contains("rt-cell")) tip.show(event, spec.hover(+t.dataset.r, +t.dataset.c));
      else tip.hide();
    });
    svg.addEventListener("mouseleave", () => tip.hide());
    svg.addEventListener("click", (event) => {
      const t = event.target;
      if (t.classList.contains("rt-cell") && spec.click) spec.click(+t.dataset.r, +t.dataset.c);
      else if (t.dataset.row !== undefined && spec.clickRow) spec.clickRow(+t.dataset.row);
    });
    return svg;
  }

  function legend(container, scale, title) {
    const box = html("div", { class: "rt-legend" }, container);
    html("span", {}, box, fmt(scale.lo, 2));
    const bar = html("span", { class: "rt-bar" }, box);
    const stops = [];
    for (let i = 0; i <= 10; i++) {
      const v = scale.lo + (i / 10) * (scale.hi - scale.lo);
      stops.push(colour(scale, v) + " " + i * 10 + "%");
    }
    bar.style.background = "linear-gradient(to right," + stops.join(",") + ")";
    html("span", {}, box, fmt(scale.hi, 2));
    html("span", { class: "rt-legend-title" }, box, title);
    return box;
  }

  function tooltip() {
    const node = html("div", { class: "rt-tip" }, document.body);
    return {
      node: node,
      show(event, text) {
        node.textContent = text;
        node.style.display = "block";
        node.style.left = event.pageX + 14 + "px";
        node.style.top = event.pageY + 12 + "px";
      },
      hide() { node.style.display = "none"; },
    };
  }

  function select(parent, name, label, options, onChange) {
    const wrap = html("label", { class: "rt-control" }, parent, label + " ");
    const box = html("select", { "data-control": name }, wrap);
    options.forEach(([value, text]) => html("option", { value: String(value) }, box, text));
    box.addEventListener("change", onChange);
    return box;
  }

  function short(text, n) {
    return text.length <= n ? text : text.slice(0, n - 1) + "\u2026";
  }

  // -- decompose: token x token maps --------------------------------------------------------
  async function decompose(root, data, tip) {
    await decodeAll(data.maps);
    const byKey = {};
    data.maps.forEach((m) => { byKey[m.text + "|" + m.block + "|" + m.measure] = m.map; });
    const controls = html("div", { class: "rt-controls" }, root);
    const texts = data.texts.map((t) => [t.id, t.id + ": " + short(t.text, 48)]);
    const textBox = select(controls, "text", "text", texts, draw);
    const blockBox = select(controls, "block", "block", data.blocks.map((b) => [b, String(b)]), draw);
    const measureBox = select(controls, "measure", "measure", data.measures.map((m) => [m.key, m.label]), draw);
    const headOptions = [["mean", "mean of heads"]].concat(
      data.heads.map((h) => [h, "head " + h]));
    const headBox = select(controls, "head", "head", headOptions, draw);
    const about = html("p", { class: "rt-about" }, root);
    const mapBox = html("div", { class: "rt-figure" }, root);
    const rowTitle = html("h4", { class: "rt-subtitle" }, root);
    const rowBox = html("div", { class: "rt-figure", "data-role": "row-across-blocks" }, root);
    let target = null;

    function key(text, block) {
      const measure = measureBox.value;
      if (measure === "attention" && headBox.value !== "mean") return text + "|" + block + "|head" + headBox.value;
      return text + "|" + block + "|" + measure;
    }

    function draw() {
      const text = data.texts.find((t) => String(t.id) === textBox.value);
      const measure = data.measures.find((m) => m.key === measureBox.value);
      headBox.disabled = measure.key !== "attention" || !data.heads.length;
      const map = byKey[key(text.id, blockBox.value)];
      const tokens = text.tokens;
      const labels = tokens.map((t, i) => i + " " + short(t, 12));
      about.textContent = measure.about;
      mapBox.innerHTML = "";
      if (!map) { html("p", { class: "rt-missing" }, mapBox, "not kept for this text and block"); return; }
      const scale = { kind: "seq", lo: measure.lo, hi: measure.hi };
      heatmap(mapBox, {
        name: "decompose", rows: tokens.length, cols: tokens.length, values: map.values,
        rowLabels: labels, colLabels: labels, rowTitle: "target token i (click: its row across blocks)",
        colTitle: "source token j", scale: scale,
        hover: (r, c) => "target " + r + " '" + tokens[r] + "' \u2190 source " + c + " '" + tokens[c] +
          "': " + measure.short + " = " + fmt(map.values[r * tokens.length + c]),
        click: (r) => { target = r; drawRow(); }, clickRow: (r) => { target = r; drawRow(); },
      }, tip);
      legend(mapBox, scale, measure.short);
      drawRow();
    }

    function drawRow() {
      rowBox.innerHTML = "";
      const text = data.texts.find((t) => String(t.id) === textBox.value);
      if (target === null || target >= text.tokens.length) { rowTitle.textContent = ""; return; }
      const measure = data.measures.find((m) => m.key === measureBox.value);
      const n = text.tokens.length;
      const values = new Float64Array(data.blocks.length * n).fill(NaN);
      data.blocks.forEach((b, i) => {
        const map = byKey[key(text.id, b)];
        if (map) for (let j = 0; j < n; j++) values[i * n + j] = map.values[target * n + j];
      });
      rowTitle.textContent = "token " + target + " '" + text.tokens[target] + "': its row at every block";
      const scale = { kind: "seq", lo: measure.lo, hi: measure.hi };
      heatmap(rowBox, {
        name: "row", rows: data.blocks.length, cols: n, values: values,
        rowLabels: data.blocks.map((b) => "block " + b), colLabels: text.tokens.map((t, i) => i + " " + short(t, 12)),
        rowTitle: "block", colTitle: "source token j", scale: scale,
        hover: (r, c) => "block " + data.blocks[r] + ": target " + target + " '" + text.tokens[target] +
          "' \u2190 source " + c + " '" + text.tokens[c] + "': " + measure.short + " = " + fmt(values[r * n + c]),
      }, tip);
    }
    draw();
  }

  // -- perturb: original vs perturbed attention of a chosen head --------------------------------
  async function perturb(root, data, tip) {
    await decodeAll(data.patterns.map((p) => p.original).concat(data.patterns.map((p) => p.perturbed)));
    const patterns = {};
    data.patterns.forEach((p) => { patterns[p.block + "|" + p.head] = p; });
    const rows = {};
    data.heads_table.forEach((h) => { rows[h.block + "|" + h.head] = h; });
    const controls = html("div", { class: "rt-controls" }, root);
    const available = data.patterns.map((p) => [p.block + "|" + p.head, "L" + p.block + "H" + p.head]);
    const headBox = select(controls, "head", "head", available, drawHead);
    html("p", { class: "rt-about" }, root, data.about);
    const gridBox = html("div", { class: "rt-figure", "data-role": "grid" }, root);
    const info = html("p", { class: "rt-info" }, root);
    const pair = html("div", { class: "rt-pair" }, root);
    const left = html("div", { class: "rt-figure", "data-role": "original" }, pair);
    const right = html("div", { class: "rt-figure", "data-role": "perturbed" }, pair);
    const nb = data.blocks.length, nh = data.n_heads;
    const values = new Float64Array(nb * nh).fill(NaN);
    data.heads_table.forEach((h) => { values[h.block * nh + h.head] = h.follow_index; });
    const scale = { kind: "div", lo: -1, hi: 1 };
    heatmap(gridBox, {
      name: "grid", rows: nb, cols: nh, values: values, cell: 18,
      rowLabels: data.blocks.map((b) => String(b)), colLabels: Array.from({ length: nh }, (_, h) => String(h)),
      rowTitle: "block", colTitle: "head", scale: scale,
      hover: (r, c) => {
        const h = rows[r + "|" + c];
        return h ? h.head_name + ": index " + fmt(h.follow_index, 3) + " [" + fmt(h.follow_index_lo, 3) + ", " +
          fmt(h.follow_index_hi, 3) + "], " + h.verdict : "n/a";
      },
      click: (r, c) => {
        if (patterns[r + "|" + c]) { headBox.value = r + "|" + c; drawHead(); }
      },
    }, tip);
    legend(gridBox, scale, "token-following index (click a head with a pattern kept)");

    function side(box, tokens, map, title) {
      box.innerHTML = "";
      html("h4", { class: "rt-subtitle" }, box, title);
      const labels = tokens.map((t, i) => i + " " + short(t, 12));
      const n = tokens.length;
      heatmap(box, {
        name: title, rows: n, cols: n, values: map.values, cell: Math.max(5, Math.min(20, Math.floor(360 / n))),
        rowLabels: labels, colLabels: labels, rowTitle: "query", colTitle: "key",
        scale: { kind: "seq", lo: 0, hi: 1 },
        hover: (r, c) => title + ": query " + r + " '" + tokens[r] + "' \u2192 key " + c + " '" + tokens[c] +
          "': weight " + fmt(map.values[r * n + c]),
      }, tip);
      legend(box, { kind: "seq", lo: 0, hi: 1 }, "attention weight");
    }

    function drawHead() {
      const p = patterns[headBox.value];
      const h = rows[headBox.value];
      info.textContent = h.head_name + " under '" + data.label + "': token-following index " +
        fmt(h.follow_index, 3) + " [95% interval " + fmt(h.follow_index_lo, 3) + ", " + fmt(h.follow_index_hi, 3) +
        "] over " + h.n_texts + " text(s); noise floor " + fmt(h.noise_floor, 3) + "; verdict: " + h.verdict +
        ". Pattern kept " + fmt(h.sim_token, 3) + " aligned by token, " + fmt(h.sim_position, 3) + " by position.";
      side(left, data.tokens, p.original.map, "original");
      side(right, data.perturbed_tokens, p.perturbed.map, "perturbed (" + data.label + ")");
    }
    drawHead();
  }

  // -- lens: the top token of every position at every layer ----------------------------------
  async function lens(root, data, tip) {
    const items = [];
    data.grids.forEach((g) => g.arrs.forEach((a) => items.push(a)));
    await decodeAll(items);
    const controls = html("div", { class: "rt-controls" }, root);
    const textBox = select(controls, "text", "text", data.texts.map((t) => [t.id, t.id + ": " + short(t.text, 48)]), draw);
    const lenses = [...new Set(data.grids.map((g) => g.lens))];
    const lensBox = select(controls, "lens", "lens", lenses.map((l) => [l, l]), draw);
    const colourBox = select(controls, "colour", "colour", data.colours.map((c) => [c.key, c.label]), draw);
    html("p", { class: "rt-about" }, root, data.about);
    const box = html("div", { class: "rt-figure" }, root);

    function draw() {
      const text = data.texts.find((t) => String(t.id) === textBox.value);
      const top = data.grids.find((g) => String(g.text) === textBox.value && g.lens === lensBox.value);
      const grid = top && top.arrs.find((a) => a.colour === colourBox.value);
      box.innerHTML = "";
      if (!grid) { html("p", { class: "rt-missing" }, box, "not kept for this text"); return; }
      const c = data.colours.find((x) => x.key === colourBox.value);
      const n = text.tokens.length, L = data.layers.length;
      // rows: layers from the top (last layer first), columns: positions
      const values = new Float64Array(L * n), words = [];
      for (let r = 0; r < L; r++) {
        const layer = L - 1 - r;
        for (let p = 0; p < n; p++) {
          values[r * n + p] = grid.map.values[p * L + layer];
          words.push(short(data.vocab[top.top[p * L + layer]], 6));
        }
      }
      const scale = { kind: "seq", lo: c.lo, hi: c.hi };
      heatmap(box, {
        name: "lens", rows: L, cols: n, values: values, cellText: words, cell: 18, cellW: 46,
        rowLabels: data.layers.slice().reverse().map((l) => "layer " + l),
        colLabels: text.tokens.map((t, i) => i + " " + short(t, 12)),
        rowTitle: "layer", colTitle: "input position", scale: scale,
        hover: (r, p) => {
          const layer = data.layers[L - 1 - r];
          return "position " + p + " '" + text.tokens[p] + "', layer " + layer + ": top token '" +
            data.vocab[top.top[p * L + (L - 1 - r)]] + "', " + c.short + " = " + fmt(values[r * n + p]);
        },
      }, tip);
      legend(box, scale, c.label);
    }
    draw();
  }

  // -- patch: the effect of restoring each state ----------------------------------------------
  async function patch(root, data, tip) {
    await decodeAll(data.maps);
    const controls = html("div", { class: "rt-controls" }, root);
    const pairBox = select(controls, "pair", "pair", data.pairs.map((p) => [p.id, p.id + ": " + short(p.clean, 40)]), draw);
    const sites = [...new Set(data.maps.map((m) => m.site))];
    const siteBox = select(controls, "site", "site", sites.map((s) => [s, data.site_labels[s] || s]), draw);
    const samples = [...new Set(data.maps.map((m) => m.sample))];
    const sampleBox = select(controls, "sample", "sample", samples.map((s) => [s, String(s)]), draw);
    sampleBox.disabled = samples.length < 2;
    html("p", { class: "rt-about" }, root, data.about);
    const info = html("p", { class: "rt-info" }, root);
    const box = html("div", { class: "rt-figure" }, root);

    function draw() {
      const pair = data.pairs.find((p) => String(p.id) === pairBox.value);
      const map = data.maps.find((m) => String(m.pair) === pairBox.value && m.site === siteBox.value &&
        String(m.sample) === sampleBox.value);
      box.innerHTML = "";
      info.textContent = "clean: " + pair.clean + " | corrupt: " + pair.corrupt + " | metric " + pair.metric +
        ": clean " + fmt(pair.metric_clean, 3) + ", corrupt " + fmt(pair.metric_corrupt, 3);
      if (!map) { html("p", { class: "rt-missing" }, box, "not kept for this pair and site"); return; }
      const [rows, cols] = map.map.shape;
      const values = map.map.values;
      const finite = Array.from(values).filter((v) => !Number.isNaN(v));
      const scale = { kind: "div", lo: Math.min(-0.25, ...finite), hi: Math.max(1, ...finite) };
      const rowLabels = map.row_labels;
      heatmap(box, {
        name: "patch", rows: rows, cols: cols, values: values,
        rowLabels: rowLabels, colLabels: map.col_labels, rowTitle: map.row_title, colTitle: map.col_title,
        scale: scale,
        hover: (r, c) => map.row_title + " " + rowLabels[r] + ", " + map.col_title + " " + map.col_labels[c] +
          ": effect " + fmt(values[r * cols + c]),
      }, tip);
      legend(box, scale, "effect: (patched - corrupt) / (clean - corrupt)");
    }
    draw();
  }

  const KINDS = { decompose: decompose, perturb: perturb, lens: lens, patch: patch };

  async function start() {
    const tip = tooltip();
    const sections = Array.from(document.querySelectorAll("section.rt-view"));
    await Promise.all(sections.map(async (section) => {
      const data = JSON.parse(section.querySelector("script.rt-data").textContent);
      const root = section.querySelector(".rt-body");
      try {
        await KINDS[data.kind](root, data, tip);
        section.setAttribute("data-ready", "1");
      } catch (error) {
        root.textContent = "viewer error: " + error;
        section.setAttribute("data-ready", "error");
        throw error;
      }
    }));
    document.body.setAttribute("data-ready", "1");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
