"use strict";
// detrkit explore: the views of one recorded forward pass. Everything shown comes from the
// JSON data block of this page; the typed arrays in it are gzip-compressed and base64-encoded.

const DATA = JSON.parse(document.getElementById("explore-data").textContent);
const SVG = "http://www.w3.org/2000/svg";
const A = {}; // unpacked arrays by name
const state = {
  encLayer: 0, decLayer: 0, level: "all", encQueryLevel: 0, heads: new Set(),
  query: null, pixel: null, focus: "query", zoom: true, node: null, detrMap: "attention",
};

// ------------------------------------------------------------------------------------------
// Arrays

async function unpack(blob) {
  const bytes = Uint8Array.from(atob(blob.data), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const buffer = await new Response(stream).arrayBuffer();
  const types = { float32: Float32Array, uint16: Uint16Array, uint8: Uint8Array, int32: Int32Array };
  const array = new types[blob.dtype](buffer);
  array.shape = blob.shape;
  return array;
}

// The flat offset of an index into an array of the given shape.
function offset(shape, ...index) {
  let flat = 0;
  for (let i = 0; i < shape.length; i++) flat = flat * shape[i] + (index[i] || 0);
  return flat;
}

async function unpackAll() {
  A.scores = await unpack(DATA.queries.scores);
  A.labels = await unpack(DATA.queries.labels);
  A.boxes = await unpack(DATA.queries.boxes);
  if (DATA.deformable) {
    const d = DATA.deformable;
    for (const name of ["references", "locations", "weights", "initial", "references_after"]) {
      A["dec_" + name] = await unpack(d.decoder[name]);
    }
    for (const name of ["queries", "references", "locations", "weights"]) {
      A["enc_" + name] = await unpack(d.encoder[name]);
    }
    A.encIndex = new Map();
    A.enc_queries.forEach((q, i) => A.encIndex.set(q, i));
  } else {
    A.cross = await unpack(DATA.detr.cross);
    A.crossMax = await unpack(DATA.detr.cross.maxima);
    A.encoder = await unpack(DATA.detr.encoder);
    A.encoderMax = await unpack(DATA.detr.encoder.maxima);
    if (DATA.masks) A.masks = await unpack(DATA.masks);
  }
}

// ------------------------------------------------------------------------------------------
// Small helpers

function el(tag, attrs = {}, parent = null, text = null) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}
const fmt = (x, digits = 4) => (Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : x.toFixed(digits));
const shapeText = (shape) => "[" + shape.join(", ") + "]";

// Viridis, sampled: weights from 0 (dark purple) to the largest shown (yellow).
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
function colour(t) {
  t = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(t), VIRIDIS.length - 2), f = t - i;
  const a = VIRIDIS[i], b = VIRIDIS[i + 1];
  const mix = (k) => Math.round(parseInt(a.substr(k, 2), 16) * (1 - f) + parseInt(b.substr(k, 2), 16) * f);
  return `rgb(${mix(1)},${mix(3)},${mix(5)})`;
}
const LEVEL_COLOURS = ["#ffffff", "#00e5ff", "#ff4fd8", "#ffa31a", "#9cff57", "#ff5252"];
const LAYER_DASHES = ["", "6 3", "2 3", "8 3 2 3", "1 2", "10 4", "4 4", "3 6"];
// Each head's marker: a path around (0, 0) about 10 units across.
const HEAD_MARKERS = [
  "M5,0A5,5 0 1 1 -5,0A5,5 0 1 1 5,0Z", // circle
  "M-4.5,-4.5H4.5V4.5H-4.5Z", // square
  "M0,-5.5L5,4L-5,4Z", // triangle up
  "M0,5.5L5,-4L-5,-4Z", // triangle down
  "M0,-6L6,0L0,6L-6,0Z", // diamond
  "M-5,-2.5L0,-5.5L5,-2.5L5,2.5L0,5.5L-5,2.5Z", // hexagon
  "M0,-6L1.8,-1.8L6,-1.2L2.7,1.6L3.7,5.8L0,3.5L-3.7,5.8L-2.7,1.6L-6,-1.2L-1.8,-1.8Z", // star
  "M-5,-3L-3,-5L0,-2L3,-5L5,-3L2,0L5,3L3,5L0,2L-3,5L-5,3L-2,0Z", // cross
];
const HEAD_NAMES = ["circle", "square", "triangle up", "triangle down", "diamond", "hexagon", "star", "cross"];
const marker = (head) => HEAD_MARKERS[head % HEAD_MARKERS.length];

// ------------------------------------------------------------------------------------------
// Geometry: everything is drawn in the input image's pixels.

const W = DATA.image.width, H = DATA.image.height;
const numLayers = { enc: DATA.config.enc_layers, dec: DATA.config.dec_layers };
const numHeads = DATA.deformable ? DATA.deformable.heads : DATA.detr.heads;
const numQueries = DATA.config.num_queries;

// Normalised (x, y) on a level's padded map -> image pixels: the model counts the unpadded
// area (the valid ratio of the map) as the image.
function toPixels(x, y, level) {
  const ratio = DATA.deformable.valid_ratios[level];
  return [(x / ratio[0]) * W, (y / ratio[1]) * H];
}
function boxPixels(cx, cy, w, h) {
  return [(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H];
}

// ------------------------------------------------------------------------------------------
// Controls

function option(select, value, text) {
  el("option", { value }, select, text);
}

function buildControls() {
  const enc = document.getElementById("enc-layer"), dec = document.getElementById("dec-layer");
  for (let i = 0; i < numLayers.enc; i++) option(enc, i, `${i + 1} of ${numLayers.enc}`);
  for (let i = 0; i < numLayers.dec; i++) option(dec, i, `${i + 1} of ${numLayers.dec}`);
  state.encLayer = numLayers.enc - 1;
  state.decLayer = numLayers.dec - 1;
  enc.value = state.encLayer;
  dec.value = state.decLayer;
  enc.onchange = () => { state.encLayer = +enc.value; render(); };
  dec.onchange = () => { state.decLayer = +dec.value; render(); };

  const level = document.getElementById("level"), encLevel = document.getElementById("enc-query-level");
  if (DATA.deformable) {
    option(level, "all", "all");
    DATA.deformable.spatial_shapes.forEach(([h, w], l) => {
      option(level, l, `${l} (${h}x${w})`);
      option(encLevel, l, `${l} (${h}x${w})`);
    });
    level.onchange = () => { state.level = level.value === "all" ? "all" : +level.value; render(); };
    encLevel.onchange = () => { state.encQueryLevel = +encLevel.value; render(); };
  } else {
    document.getElementById("level-control").hidden = true;
    document.getElementById("enc-level-control").hidden = true;
  }

  const heads = document.getElementById("heads");
  el("span", {}, heads, "heads: ");
  for (let m = 0; m < numHeads; m++) {
    state.heads.add(m);
    const label = el("label", { title: `head ${m + 1}: ${HEAD_NAMES[m % HEAD_NAMES.length]}` }, heads);
    const box = el("input", { type: "checkbox", "data-head": m }, label);
    box.checked = true;
    box.onchange = () => { box.checked ? state.heads.add(m) : state.heads.delete(m); render(); };
    if (DATA.deformable) { // DETR draws maps, not markers
      const icon = el("svg:svg", { width: 14, height: 14, viewBox: "-7 -7 14 14" }, label);
      el("svg:path", { d: marker(m), fill: "#888", stroke: "#222" }, icon);
    }
    label.append(` ${m + 1}`);
  }
  const only = el("button", { type: "button", id: "heads-all" }, heads, "all");
  only.onclick = () => {
    heads.querySelectorAll("input").forEach((b) => { b.checked = true; state.heads.add(+b.dataset.head); });
    render();
  };

  if (DATA.masks) {
    const map = document.getElementById("detr-map");
    document.getElementById("map-control").hidden = false;
    map.onchange = () => { state.detrMap = map.value; render(); };
  }
  const query = document.getElementById("query");
  query.max = numQueries - 1;
  query.onchange = () => {
    const q = Math.round(+query.value);
    const note = document.getElementById("query-note");
    if (Number.isFinite(q) && q >= 0 && q < numQueries) {
      note.textContent = "";
      selectQuery(q);
    } else {
      note.textContent = `queries are 0 to ${numQueries - 1}`;
      query.value = state.query;
    }
  };
  const zoom = document.getElementById("zoom");
  zoom.onchange = () => { state.zoom = zoom.checked; render(); };
}

function selectQuery(q) {
  state.query = q;
  state.focus = "query";
  document.getElementById("query").value = q;
  render();
}

function selectPixel(x, y) {
  state.pixel = [x, y];
  state.focus = "pixel";
  render();
}

// ------------------------------------------------------------------------------------------
// The image view

function imagePoint(svg, event) {
  const point = svg.createSVGPoint();
  point.x = event.clientX;
  point.y = event.clientY;
  return point.matrixTransform(svg.getScreenCTM().inverse());
}

function buildImage() {
  const svg = document.getElementById("image-svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.style.aspectRatio = `${W} / ${H}`;
  svg.style.width = `min(70vw, 1000px, ${(85 * W) / H}vh)`;
  el("svg:image", { href: DATA.image.src, x: 0, y: 0, width: W, height: H, preserveAspectRatio: "none", id: "photo" }, svg);
  for (const id of ["overlay", "detections", "boxes", "samples", "marks"]) el("svg:g", { id }, svg);
  svg.addEventListener("click", (event) => {
    const p = imagePoint(svg, event);
    if (p.x >= 0 && p.x < W && p.y >= 0 && p.y < H) selectPixel(p.x, p.y);
  });
}

// Screen-constant sizes: image units per screen pixel of the current view.
function unit() {
  const svg = document.getElementById("image-svg");
  const box = svg.viewBox.baseVal;
  return box.width / Math.max(1, svg.clientWidth || svg.getBoundingClientRect().width || box.width);
}

function clear(id) {
  const g = document.getElementById(id);
  while (g.firstChild) g.removeChild(g.firstChild);
  return g;
}

function drawDetections(u) {
  const g = clear("detections");
  const placed = []; // label rectangles so far: a label that would cover one moves up
  const lineHeight = 16 * u;
  DATA.detections.forEach((d, i) => {
    const [x1, y1, x2, y2] = d.box;
    const selected = state.focus === "query" && d.query === state.query;
    const rect = el("svg:rect", {
      class: "detection", x: x1, y: y1, width: x2 - x1, height: y2 - y1,
      stroke: selected ? "#00e5ff" : "#ffd400", "stroke-width": (selected ? 3 : 2) * u,
      "data-query": d.query, "data-index": i,
    }, g);
    // The outline and the label select the query; a click inside the box picks a pixel.
    const hit = el("svg:rect", {
      class: "detection-hit", x: x1, y: y1, width: x2 - x1, height: y2 - y1, fill: "none",
      stroke: "transparent", "stroke-width": 10 * u, "data-query": d.query,
    }, g);
    const text = `#${i + 1} ${d.label} ${d.score.toFixed(2)}`;
    const width = text.length * 8 * u;
    let y = y1 - 4 * u;
    const covers = (p) => x1 < p.x + p.width && p.x < x1 + width && y - lineHeight < p.y && p.y - lineHeight < y;
    for (let tries = 0; tries < 12 && placed.some(covers); tries++) y -= lineHeight;
    placed.push({ x: x1, y, width });
    const label = el("svg:text", { class: "detection-label", x: x1 + 2 * u, y, "font-size": 14 * u, "stroke-width": 3 * u, "data-query": d.query }, g, text);
    for (const target of [rect, hit, label]) {
      target.style.pointerEvents = target === label ? "all" : "stroke";
      target.style.cursor = "pointer";
      target.addEventListener("click", (event) => { event.stopPropagation(); selectQuery(d.query); });
    }
    const also = d.also.map(([name, score]) => `, ${name} ${score.toFixed(2)}`).join("");
    el("svg:title", {}, hit, `#${i + 1} ${d.label} ${d.score.toFixed(2)}${also} (query ${d.query})`);
  });
}

function cross(g, x, y, size, colour, attrs) {
  // A dark outline first: a white or yellow mark stays visible on a light picture.
  el("svg:path", {
    d: `M${x - size},${y}H${x + size}M${x},${y - size}V${y + size}`,
    stroke: "#000", "stroke-width": size / 3.5 + size / 4, fill: "none", "stroke-opacity": 0.8,
  }, g);
  return el("svg:path", {
    d: `M${x - size},${y}H${x + size}M${x},${y - size}V${y + size}`,
    stroke: colour, "stroke-width": size / 3.5, fill: "none", ...attrs,
  }, g);
}

// The query's box after every decoder layer (the selected one bold) and the sampling points.
function drawQuery(u, extent) {
  const q = state.query, boxes = clear("boxes"), samples = clear("samples"), marks = clear("marks");
  const L = numLayers.dec;
  for (let layer = 0; layer < L; layer++) {
    const o = offset(A.boxes.shape, layer, q, 0);
    const [x1, y1, x2, y2] = boxPixels(A.boxes[o], A.boxes[o + 1], A.boxes[o + 2], A.boxes[o + 3]);
    const selected = layer === state.decLayer;
    el("svg:rect", {
      x: x1, y: y1, width: x2 - x1, height: y2 - y1, fill: "none", class: "layer-box",
      stroke: selected ? "#00e5ff" : "#e0e0e0", "stroke-opacity": selected ? 1 : 0.75,
      "stroke-width": (selected ? 2.5 : 1.2) * u, "stroke-dasharray": LAYER_DASHES[layer % LAYER_DASHES.length].split(" ").map((v) => v * u).join(" "),
      "data-layer": layer,
    }, boxes);
    // Layer numbers side by side along the top edge, so that overlapping boxes stay readable.
    el("svg:text", {
      x: x1 + (2 + 11 * layer) * u, y: y1 + 12 * u, "font-size": 11 * u, fill: selected ? "#00e5ff" : "#ffffff",
      class: "detection-label layer-label", "stroke-width": 3 * u,
    }, boxes, `${layer + 1}`);
    if (selected || state.zoom) extent.push([x1, y1], [x2, y2]);
  }
  if (!DATA.deformable) return state.detrMap === "mask" ? drawMask() : drawCrossAttention(u);

  const d = DATA.deformable, layer = state.decLayer;
  const refs = A.dec_references; // [layers, Q, L, 4]; points have w = h = 0
  const boxReference = d.decoder.formula[layer] === "boxes";
  const levels = state.level === "all" ? [...Array(d.levels).keys()] : [state.level];
  for (const level of levels) {
    const o = offset(refs.shape, layer, q, level, 0);
    const [px, py] = toPixels(refs[o], refs[o + 1], level);
    if (boxReference) {
      const ratio = d.valid_ratios[level];
      const [x1, y1, x2, y2] = boxPixels(refs[o] / ratio[0], refs[o + 1] / ratio[1], refs[o + 2] / ratio[0], refs[o + 3] / ratio[1]);
      el("svg:rect", {
        x: x1, y: y1, width: x2 - x1, height: y2 - y1, fill: "none", stroke: LEVEL_COLOURS[level % LEVEL_COLOURS.length],
        "stroke-width": 1.5 * u, "stroke-dasharray": `${5 * u} ${4 * u}`, class: "reference-box", "data-level": level,
      }, marks);
    }
    cross(marks, px, py, 9 * u, LEVEL_COLOURS[level % LEVEL_COLOURS.length], { class: "reference", "data-level": level, "data-x": px, "data-y": py });
    extent.push([px, py]);
  }
  drawSamples(samples, A.dec_locations, A.dec_weights, [layer, q], levels, u, extent, (x) => x, "decoder");
}

// Sampling points of one query: [... , M, L, P, 2] locations and [..., M, L, P] weights.
function drawSamples(g, locations, weights, prefix, levels, u, extent, decode, which) {
  const d = DATA.deformable;
  let top = 0;
  const points = [];
  for (let m = 0; m < d.heads; m++) {
    if (!state.heads.has(m)) continue;
    for (const level of levels) {
      for (let p = 0; p < d.points; p++) {
        const w = weightAt(weights, [...prefix, m, level, p], which);
        const o = offset(locations.shape, ...prefix, m, level, p, 0);
        const [x, y] = toPixels(decode(locations[o]), decode(locations[o + 1]), level);
        points.push({ m, level, p, x, y, w });
        top = Math.max(top, w);
      }
    }
  }
  points.sort((a, b) => a.w - b.w); // heavy points on top
  for (const s of points) {
    el("svg:path", {
      d: marker(s.m), transform: `translate(${s.x},${s.y}) scale(${u * 1.1})`,
      fill: colour(top > 0 ? s.w / top : 0), stroke: LEVEL_COLOURS[s.level % LEVEL_COLOURS.length], "stroke-width": 1.2,
      class: "sample", "data-head": s.m, "data-level": s.level, "data-point": s.p,
      "data-x": s.x, "data-y": s.y, "data-weight": s.w,
    }, g);
    extent.push([s.x, s.y]);
  }
  state.shownTop = top;
  state.shownPoints = points;
}

function weightAt(weights, index, which) {
  const value = weights[offset(weights.shape, ...index)];
  return which === "encoder" ? value / 255 : value;
}

// Encoder: the kept query nearest to the pixel on a level, as its index in the kept list.
function encoderQueryAt(x, y, level) {
  const d = DATA.deformable, [h, w] = d.spatial_shapes[level], step = d.encoder.steps[level];
  const ratio = d.valid_ratios[level];
  const validH = Math.max(1, Math.round(ratio[1] * h)), validW = Math.max(1, Math.round(ratio[0] * w));
  let row = Math.min(Math.floor((y / H) * validH), validH - 1);
  let col = Math.min(Math.floor((x / W) * validW), validW - 1);
  row = Math.min(Math.round(row / step) * step, Math.floor((h - 1) / step) * step);
  col = Math.min(Math.round(col / step) * step, Math.floor((w - 1) / step) * step);
  const flat = d.level_start_index[level] + row * w + col;
  return { kept: A.encIndex.get(flat), flat, row, col };
}

function drawPixel(u, extent) {
  clear("boxes");
  const samples = clear("samples"), marks = clear("marks");
  const [x, y] = state.pixel;
  cross(marks, x, y, 11 * u, "#ff3b3b", { class: "pixel", "stroke-width": 3 * u });
  extent.push([x, y]);
  if (!DATA.deformable) {
    extent.length = 0; // DETR's encoder attends over the whole image: no zoom
    return drawEncoderAttention(u);
  }
  const d = DATA.deformable, level = state.encQueryLevel;
  const found = encoderQueryAt(x, y, level);
  state.encoderQuery = found;
  const refs = A.enc_references; // [N, L, 2]
  const o = offset(refs.shape, found.kept, level, 0);
  const [px, py] = toPixels(refs[o], refs[o + 1], level);
  cross(marks, px, py, 9 * u, LEVEL_COLOURS[level % LEVEL_COLOURS.length], { class: "reference", "data-level": level, "data-x": px, "data-y": py });
  extent.push([px, py]);
  const levels = state.level === "all" ? [...Array(d.levels).keys()] : [state.level];
  const { low, high } = d.encoder.locations;
  const decode = (step) => low + (step / 65535) * (high - low);
  drawSamples(samples, A.enc_locations, A.enc_weights, [state.encLayer, found.kept], levels, u, extent, decode, "encoder");
}

// DETR: a map over the feature map's valid cells, one rectangle per cell.
function drawMap(values, u, label) {
  const g = clear("overlay");
  const [h, w] = DATA.detr.feature_shape, [vh, vw] = DATA.detr.valid_shape;
  let top = 0;
  for (let r = 0; r < vh; r++) for (let c = 0; c < vw; c++) top = Math.max(top, values[r * w + c]);
  // The photo dimmed underneath, so that the map's colours are not the picture's.
  el("svg:rect", { x: 0, y: 0, width: W, height: H, fill: "#000", "fill-opacity": 0.55 }, g);
  for (let r = 0; r < vh; r++) {
    for (let c = 0; c < vw; c++) {
      const v = values[r * w + c];
      el("svg:rect", {
        x: (c * W) / vw, y: (r * H) / vh, width: W / vw, height: H / vh,
        fill: colour(top > 0 ? v / top : 0), "fill-opacity": 0.15 + 0.6 * (top > 0 ? v / top : 0),
        class: "cell", "data-row": r, "data-col": c, "data-weight": v,
      }, g);
    }
  }
  state.shownTop = top;
  state.mapLabel = label;
}

function selectedHeads() {
  return [...state.heads].sort((a, b) => a - b);
}

// The panoptic models: the query's mask probability over the image, drawn through a canvas.
function drawMask() {
  const g = clear("overlay");
  const [, h, w] = A.masks.shape, q = state.query;
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const context = canvas.getContext("2d"), pixels = context.createImageData(w, h);
  let sum = 0;
  for (let i = 0; i < h * w; i++) {
    const p = A.masks[q * h * w + i];
    sum += p / 255;
    pixels.data.set([0, 229, 255, Math.round(p * 0.7)], 4 * i); // cyan, as opaque as likely
  }
  context.putImageData(pixels, 0, 0);
  el("svg:rect", { x: 0, y: 0, width: W, height: H, fill: "#000", "fill-opacity": 0.45 }, g);
  el("svg:image", {
    href: canvas.toDataURL(), x: 0, y: 0, width: W, height: H, preserveAspectRatio: "none",
    id: "mask-overlay", "data-query": q, "data-mean": sum / (h * w), style: "image-rendering: pixelated",
  }, g);
  state.maskCanvas = canvas;
  state.shownTop = 1;
  state.mapLabel = "mask probability";
}

function drawCrossAttention(u) {
  const [h, w] = DATA.detr.feature_shape, heads = selectedHeads();
  const values = new Float64Array(h * w);
  for (const m of heads) {
    const row = offset(A.cross.shape, state.decLayer, m, state.query, 0);
    const max = A.crossMax[offset(A.crossMax.shape, state.decLayer, m, state.query)];
    for (let i = 0; i < h * w; i++) values[i] += ((A.cross[row + i] / 65535) * max) / heads.length;
  }
  drawMap(values, u, heads.length === 1 ? `head ${heads[0] + 1}` : `mean of heads ${heads.map((m) => m + 1).join(", ")}`);
}

function drawEncoderAttention(u) {
  const [h, w] = DATA.detr.feature_shape, [vh, vw] = DATA.detr.valid_shape;
  const [x, y] = state.pixel;
  const row = Math.min(Math.floor((y / H) * vh), vh - 1), col = Math.min(Math.floor((x / W) * vw), vw - 1);
  const cell = row * w + col;
  const start = offset(A.encoder.shape, state.encLayer, cell, 0);
  const max = A.encoderMax[offset(A.encoderMax.shape, state.encLayer, cell)];
  const values = new Float64Array(h * w);
  for (let i = 0; i < h * w; i++) values[i] = (A.encoder[start + i] / 255) * max;
  state.encoderCell = [row, col];
  drawMap(values, u, "heads averaged");
}

function zoomTo(extent) {
  const svg = document.getElementById("image-svg");
  if (!state.zoom || extent.length === 0) {
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    return;
  }
  let x1 = Infinity, y1 = Infinity, x2 = -Infinity, y2 = -Infinity;
  for (const [x, y] of extent) {
    x1 = Math.min(x1, x); y1 = Math.min(y1, y); x2 = Math.max(x2, x); y2 = Math.max(y2, y);
  }
  const margin = Math.max(0.15 * Math.max(x2 - x1, y2 - y1), 0.03 * Math.max(W, H));
  x1 = Math.max(0, x1 - margin); y1 = Math.max(0, y1 - margin);
  x2 = Math.min(W, x2 + margin); y2 = Math.min(H, y2 + margin);
  // Widen the short side to the image's aspect ratio: the view keeps its shape on the page.
  let w = x2 - x1, h = y2 - y1;
  if (w / h < W / H) { const extra = (h * W) / H - w; x1 -= extra / 2; w += extra; }
  else { const extra = (w * H) / W - h; y1 -= extra / 2; h += extra; }
  if (x1 < 0 || y1 < 0 || x1 + w > W || y1 + h > H) {
    // Marks outside the image (samples that read the zero padding): show them and the image.
    const left = Math.min(0, x1), top = Math.min(0, y1);
    const right = Math.max(W, x1 + w), bottom = Math.max(H, y1 + h);
    x1 = left; y1 = top; w = right - left; h = bottom - top;
    if (w / h < W / H) { const extra = (h * W) / H - w; x1 -= extra / 2; w += extra; }
    else { const extra = (w * H) / W - h; y1 -= extra / 2; h += extra; }
  } else if (w >= 0.8 * W || h >= 0.8 * H) { x1 = 0; y1 = 0; w = W; h = H; }
  svg.setAttribute("viewBox", `${x1} ${y1} ${w} ${h}`);
}

// Controls that do not apply to the view shown are hidden or disabled.
function updateControls() {
  const pixel = state.focus === "pixel";
  if (DATA.deformable) {
    document.getElementById("enc-level-control").hidden = !pixel;
  } else {
    const heads = document.getElementById("heads");
    heads.querySelectorAll("input, button").forEach((b) => { b.disabled = pixel; });
    heads.title = pixel ? "the encoder's self-attention is stored averaged over the heads" : "";
  }
}

function renderImage() {
  updateControls();
  clear("overlay");
  // Draw once at full view to measure what the selection covers, then zoom and redraw so that
  // marks keep their size on screen.
  for (let pass = 0; pass < 2; pass++) {
    const extent = [];
    const u = unit();
    drawDetections(u);
    if (state.focus === "pixel" && state.pixel) drawPixel(u, extent);
    else if (state.query !== null) drawQuery(u, extent);
    if (pass === 0) zoomTo(extent);
  }
  renderSelection();
  renderLegend();
  renderDetectionList();
}

// ------------------------------------------------------------------------------------------
// Selection details and legend

function renderSelection() {
  const box = document.getElementById("selection");
  box.innerHTML = "";
  const q = state.query;
  if (state.focus === "pixel" && state.pixel) {
    const [x, y] = state.pixel;
    if (DATA.deformable) {
      const f = state.encoderQuery, level = state.encQueryLevel;
      el("p", {}, box, `Pixel (${x.toFixed(1)}, ${y.toFixed(1)}): the encoder query of level ${level} cell (row ${f.row}, column ${f.col}), sequence index ${f.flat}, in encoder layer ${state.encLayer + 1}; it samples every level. Stored encoder queries on this level: ${stepText(DATA.deformable.encoder.steps[level])} (the nearest stored one is shown).`);
      sampleTable(box);
    } else {
      const [r, c] = state.encoderCell;
      el("p", {}, box, `Pixel (${x.toFixed(1)}, ${y.toFixed(1)}): feature-map cell (row ${r}, column ${c}); its self-attention in encoder layer ${state.encLayer + 1}, ${state.mapLabel}; largest weight ${fmt(state.shownTop, 5)}.`);
    }
    return;
  }
  if (q === null) return;
  const det = DATA.detections.find((d) => d.query === q);
  const name = DATA.class_names[A.labels[q]];
  const o = offset(A.boxes.shape, state.decLayer, q, 0);
  const b = Array.from(A.boxes.slice(o, o + 4)).map((v) => v.toFixed(4)).join(", ");
  let text = `Query ${q}: best class ${name} ${A.scores[q].toFixed(3)}${det ? " (detected)" : ""}. After decoder layer ${state.decLayer + 1}: box (cx, cy, w, h) = (${b}), normalised.`;
  if (DATA.deformable) {
    const r = A.dec_references, ro = offset(r.shape, state.decLayer, q, 0, 0);
    const count = DATA.deformable.decoder.formula[state.decLayer] === "boxes" ? 4 : 2;
    const ref = Array.from(r.slice(ro, ro + count)).map((v) => v.toFixed(4)).join(", ");
    text += ` Its reference at layer ${state.decLayer + 1} (level 0): (${ref}); sampling formula: ${DATA.deformable.decoder.formula[state.decLayer]}.`;
    el("p", {}, box, text);
    sampleTable(box);
  } else {
    if (state.detrMap === "mask") {
      const [, h, w] = A.masks.shape;
      text += ` Its mask: sigmoid of its ${h}x${w} mask logits (stride 4), stored in steps of 1/255; cyan as opaque as the probability.`;
    } else {
      text += ` Cross-attention over the ${DATA.detr.feature_shape.join("x")} feature map, ${state.mapLabel} (heads count from 1); largest weight ${fmt(state.shownTop, 5)}; ${uniformText()}.`;
    }
    el("p", {}, box, text);
  }
}

function sampleTable(box) {
  const points = [...state.shownPoints].sort((a, b) => b.w - a.w).slice(0, 12);
  const encoder = state.focus === "pixel";
  el("p", { class: "small" }, box, "The heaviest samples shown: x, y in image pixels; heads and points count from 1, levels from 0 (as the level selector)." +
    (encoder ? " Encoder weights are stored in steps of 1/255 (shown to 3 decimals)." : ""));
  const table = el("table", {}, box);
  const head = el("tr", {}, table);
  for (const t of ["head", "level", "point", "x", "y", "weight", ""]) el("th", {}, head, t);
  for (const s of points) {
    const row = el("tr", {}, table);
    const outside = s.x < 0 || s.y < 0 || s.x > W || s.y > H;
    const weight = encoder ? "≈" + s.w.toFixed(3) : s.w.toFixed(4);
    for (const v of [s.m + 1, s.level, s.p + 1, s.x.toFixed(1), s.y.toFixed(1), weight, outside ? "outside the image: reads the zero padding" : ""]) el("td", {}, row, `${v}`);
  }
}

function renderDetectionList() {
  const list = document.getElementById("detection-list");
  list.innerHTML = "";
  el("strong", {}, list, `Detections (${DATA.detections.length})`);
  if (DATA.pairs > DATA.detections.length) {
    el("p", { class: "small" }, list, `${DATA.pairs} (query, class) pairs passed the threshold; one entry per query, its best class first.`);
  }
  const ol = el("ol", {}, list);
  DATA.detections.forEach((d) => {
    const li = el("li", {}, ol);
    const also = d.also.map(([name, score]) => `, ${name} ${score.toFixed(2)}`).join("");
    const button = el("button", { type: "button", "data-query": d.query }, li, `${d.label} ${d.score.toFixed(2)}${also} (query ${d.query})`);
    if (state.focus === "query" && state.query === d.query) button.classList.add("current");
    button.onclick = () => selectQuery(d.query);
  });
}

function legendItem(dl, icon, title, text) {
  const dt = el("dt", {}, dl);
  dt.appendChild(icon);
  dt.append(" " + title);
  el("dd", {}, dl, text);
}

function icon(draw) {
  const svg = el("svg:svg", { width: 22, height: 16, viewBox: "-11 -8 22 16" });
  svg.style.background = "#444";
  svg.style.verticalAlign = "middle";
  draw(svg);
  return svg;
}

// What every weight would be if attention were spread evenly: a scale for the colours.
function uniformText() {
  if (DATA.deformable) {
    const n = DATA.deformable.levels * DATA.deformable.points;
    return `evenly spread, each of a head's ${n} samples (levels x points) would weigh 1/${n} = ${fmt(1 / n, 4)}`;
  }
  const [vh, vw] = DATA.detr.valid_shape;
  return `evenly spread, each of the ${vh * vw} cells would weigh 1/${vh * vw} = ${fmt(1 / (vh * vw), 5)}`;
}

function renderLegend() {
  const legend = document.getElementById("legend");
  legend.innerHTML = "";
  el("strong", {}, legend, "Legend");
  const dl = el("dl", {}, legend);
  legendItem(dl, icon((s) => el("svg:rect", { x: -9, y: -6, width: 18, height: 12, fill: "none", stroke: "#ffd400", "stroke-width": 2 }, s)),
    "detection", `a query scoring at least ${DATA.threshold}; click it to follow that query`);
  if (state.focus === "pixel") {
    legendItem(dl, icon((s) => cross(s, 0, 0, 6, "#ff3b3b", { "stroke-width": 2 })), "the pixel", "the pixel you picked");
  } else {
    legendItem(dl, icon((s) => el("svg:rect", { x: -9, y: -6, width: 18, height: 12, fill: "none", stroke: "#00e5ff", "stroke-width": 2.5 }, s)),
      "box after the selected layer", "the query's prediction after this decoder layer; the number on its top edge is the layer");
    legendItem(dl, icon((s) => el("svg:rect", { x: -9, y: -6, width: 18, height: 12, fill: "none", stroke: "#e0e0e0", "stroke-dasharray": "6 3" }, s)),
      "boxes after the other layers", "one dash pattern per layer, numbered 1, 2, ... along the top edge");
  }
  if (DATA.deformable) {
    legendItem(dl, icon((s) => cross(s, 0, 0, 6, LEVEL_COLOURS[1], {})), "reference point",
      (state.focus === "pixel" ? "the encoder query's own cell centre" : "where this decoder layer's query samples around, one per level") +
      "; its colour is its level's (below)");
    if (DATA.decoder_references !== "points" && state.focus !== "pixel") {
      legendItem(dl, icon((s) => el("svg:rect", { x: -9, y: -6, width: 18, height: 12, fill: "none", stroke: "#00e5ff", "stroke-dasharray": "4 3" }, s)),
        "reference box", "box references: the sampling offsets are scaled by this box's size");
    }
    for (let m = 0; m < numHeads; m++) {
      legendItem(dl, icon((s) => el("svg:path", { d: marker(m), fill: "#b5de2b", stroke: "#fff" }, s)), `head ${m + 1}`, `${HEAD_NAMES[m % HEAD_NAMES.length]} marker`);
    }
    DATA.deformable.spatial_shapes.forEach(([h, w], l) => legendItem(dl,
      icon((s) => el("svg:circle", { r: 5, fill: "#666", stroke: LEVEL_COLOURS[l % LEVEL_COLOURS.length], "stroke-width": 2 }, s)),
      `level ${l}`, `the ${h}x${w} map: outline of its samples, colour of its reference mark`));
  } else if (state.focus === "query" && state.detrMap === "mask") {
    legendItem(dl, icon((s) => el("svg:rect", { x: -9, y: -6, width: 18, height: 12, fill: "#00e5ff", "fill-opacity": 0.7 }, s)),
      "the query's mask", "cyan, as opaque as the mask probability (transparent: 0, strongest: 1)");
    return;
  } else {
    legendItem(dl, icon((s) => el("svg:rect", { x: -9, y: -6, width: 18, height: 12, fill: colour(0.8), "fill-opacity": 0.7 }, s)),
      "feature-map cell", state.focus === "pixel" ? "encoder self-attention of the pixel's cell (heads averaged)" : "cross-attention weight of the query on this cell");
  }
  const bar = el("div", { class: "colour-bar" }, legend);
  bar.style.height = "12px";
  bar.style.background = `linear-gradient(to right, ${VIRIDIS.join(",")})`;
  el("div", { class: "small" }, legend, `colour: attention weight, 0 to ${fmt(state.shownTop || 0, 4)} (the largest shown); ${uniformText()}`);
}

// ------------------------------------------------------------------------------------------
// The network graph

const COLUMNS = [
  ["input", "backbone", "position"],
  ["input projection", "levels"],
  ["encoder layer"],
  ["memory", "two-stage proposals", "decoder queries"],
  ["decoder layer"],
  ["decoder output", "heads", "mask head"],
];
const NODE_W = 200, NODE_H = 38, COL_GAP = 80, ROW_GAP = 12, TOP = 30, LEFT = 60;

function shownCall(node) {
  if (node.stage === "encoder layer") return node.calls[Math.min(state.encLayer, node.calls.length - 1)];
  if (node.stage === "decoder layer" || node.stage === "heads") return node.calls[Math.min(state.decLayer, node.calls.length - 1)];
  return node.calls[0];
}

function callShapes(node) {
  const call = shownCall(node);
  if (node.repeated || node.calls.length === 1) return shapeText(call.shape);
  return [...new Set(node.calls.map((c) => shapeText(c.shape)))].join(" | ");
}

function layoutGraph() {
  const place = {};
  const heights = [];
  COLUMNS.forEach((stages, col) => {
    let y = TOP;
    for (const stage of stages) {
      const nodes = DATA.graph.filter((n) => n.stage === stage);
      if (!nodes.length) continue;
      y += 18;
      place["stage:" + stage] = { x: LEFT + col * (NODE_W + COL_GAP), y: y - 6, col };
      for (const node of nodes) {
        place[node.key] = { x: LEFT + col * (NODE_W + COL_GAP), y, col };
        y += NODE_H + ROW_GAP;
      }
    }
    heights.push(y);
  });
  return { place, width: LEFT + COLUMNS.length * (NODE_W + COL_GAP), height: Math.max(...heights) + 20 };
}

function renderGraph() {
  const svg = document.getElementById("graph-svg");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const { place, width, height } = layoutGraph();
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const edges = el("svg:g", {}, svg), nodes = el("svg:g", {}, svg);
  const byKey = Object.fromEntries(DATA.graph.map((n) => [n.key, n]));
  const selected = state.node;
  for (const [key, p] of Object.entries(place)) {
    if (!key.startsWith("stage:")) continue;
    const stage = key.slice(6);
    let title = stage;
    if (stage === "encoder layer") title += ` x${numLayers.enc}: layer ${state.encLayer + 1} shown`;
    if (stage === "decoder layer" || stage === "heads") title += ` x${numLayers.dec}: layer ${state.decLayer + 1} shown`;
    el("svg:text", { x: p.x, y: p.y, class: "stage-title" }, nodes, title);
  }
  for (const node of DATA.graph) {
    const to = place[node.key];
    for (const input of node.inputs) {
      const from = place[input];
      if (!from || !byKey[input]) continue;
      const linked = selected && (selected === node.key || selected === input);
      const cls = linked ? "edge linked" : "edge";
      let d, lx, ly;
      if (from.col < to.col) {
        const x1 = from.x + NODE_W, y1 = from.y + NODE_H / 2, x2 = to.x, y2 = to.y + NODE_H / 2;
        d = `M${x1},${y1}C${x1 + COL_GAP / 2},${y1} ${x2 - COL_GAP / 2},${y2} ${x2},${y2}`;
        // At the source: every edge leaving a node carries the same shape, written once.
        lx = x1 + 4; ly = y1 - 3;
      } else {
        // Within a column: an arc on the left side.
        const x1 = from.x, y1 = from.y + NODE_H / 2, x2 = to.x, y2 = to.y + NODE_H / 2;
        const bulge = 14 + Math.min(60, Math.abs(y2 - y1) / 6);
        d = `M${x1},${y1}C${x1 - bulge},${y1} ${x2 - bulge},${y2} ${x2},${y2}`;
        lx = x1 - bulge - 2; ly = (y1 + y2) / 2;
      }
      el("svg:path", { d, class: cls, "data-from": input, "data-to": node.key }, edges);
      const label = el("svg:text", { x: lx, y: ly, class: linked ? "edge-label linked" : "edge-label", "data-from": input, "data-to": node.key,
        "text-anchor": from.col < to.col ? "start" : "end" }, edges, callShapes(byKey[input]));
      if (!linked && from.col >= to.col) label.setAttribute("display", "none"); // shown with the node's selection
    }
  }
  for (const node of DATA.graph) {
    const p = place[node.key];
    const linked = selected && (node.inputs.includes(selected) || (byKey[selected] && byKey[selected].inputs.includes(node.key)));
    const g = el("svg:g", { class: "node" + (node.key === selected ? " selected" : linked ? " linked" : ""), transform: `translate(${p.x},${p.y})`, "data-key": node.key }, nodes);
    el("svg:rect", { width: NODE_W, height: NODE_H }, g);
    el("svg:text", { x: 6, y: 15 }, g, node.label.length > 34 ? node.label.slice(0, 33) + "…" : node.label);
    const shapes = callShapes(node);
    el("svg:text", { x: 6, y: 30, class: "shape" }, g, shapes.length > 32 ? shapes.slice(0, 31) + "…" : shapes);
    el("svg:title", {}, g, `${node.label}: ${node.note}`);
    g.addEventListener("click", () => { state.node = node.key; renderGraph(); renderNode(); });
  }
}

function renderNode() {
  const panel = document.getElementById("node-panel");
  panel.innerHTML = "";
  const node = DATA.graph.find((n) => n.key === state.node);
  if (!node) return;
  el("h3", {}, panel, node.label);
  let where = node.stage;
  if (node.stage === "encoder layer") where += ` ${state.encLayer + 1} of ${numLayers.enc}`;
  if (node.stage === "decoder layer" || node.stage === "heads") where += ` ${state.decLayer + 1} of ${numLayers.dec}`;
  el("p", { class: "small" }, panel, where);
  el("p", {}, panel, node.note);
  el("p", { class: "small" }, panel, `${node.code.path}:${node.code.number}`);
  el("pre", { class: "code" }, panel, node.code.text);
  const call = shownCall(node);
  const table = el("table", {}, panel);
  const row = (k, v) => { const tr = el("tr", {}, table); el("td", {}, tr, k); el("td", {}, tr, v); };
  row("shape", shapeText(call.shape));
  if (!node.repeated && node.calls.length > 1) row("all calls", callShapes(node));
  row("dtype", call.dtype);
  if (call.stats) for (const [k, v] of Object.entries(call.stats)) row(k, fmt(v, 5));
  if (call.values) row("values", JSON.stringify(call.values));
  const label = (k) => (DATA.graph.find((n) => n.key === k) || { label: k }).label;
  if (node.inputs.length) row("from", node.inputs.map(label).join("; "));
  const users = DATA.graph.filter((n) => n.inputs.includes(node.key)).map((n) => `${n.label} (${n.stage})`);
  if (users.length) row("to", users.join("; "));
}

// ------------------------------------------------------------------------------------------

// "every cell", or "one cell in 3 x 3" when a level's encoder queries were thinned out.
const stepText = (step) => (step === 1 ? "every cell" : `one cell in ${step} x ${step}`);

function renderHeader() {
  document.getElementById("variant").textContent = DATA.variant;
  const n = DATA.detections.length;
  let summary = `${DATA.source} on a ${W}x${H} image (the model saw ${DATA.input_size[1]}x${DATA.input_size[0]}, width x height): ${n} detection${n === 1 ? "" : "s"} scoring at least ${DATA.threshold}.`;
  if (n === 0) summary += ` Nothing passed the threshold: the highest score was ${DATA.best.score.toFixed(3)} (${DATA.best.label}, query ${DATA.best.query}), shown below.`;
  document.getElementById("summary").textContent = summary;
  const formula = document.getElementById("formula");
  if (DATA.deformable) {
    formula.textContent = Object.values(DATA.formulas).join("\n");
    formula.style.whiteSpace = "pre-wrap";
  } else {
    formula.textContent = "DETR cross-attention: Q = tgt + query_pos, K = memory + pos, V = memory; encoder: Q = K = src + pos, V = src";
  }
  const storage = document.getElementById("storage");
  if (DATA.deformable) {
    const steps = DATA.deformable.encoder.steps.map((s, l) => `level ${l}: ${stepText(s)}`).join(", ");
    storage.textContent = "Stored exactly (float32): boxes, reference points, decoder sampling locations and weights. " +
      `Quantised: encoder sampling locations (uint16 steps of their range, under 0.05 pixel) and weights (steps of 1/255); encoder queries kept for pixel selection: ${steps} (the nearest kept cell is shown).`;
  } else {
    storage.textContent = "Quantised: cross-attention weights as uint16 steps of each row's maximum (relative error under 1e-5); " +
      "encoder self-attention stored heads averaged, as uint8 steps of each row's maximum.";
  }
}

async function main() {
  await unpackAll();
  renderHeader();
  buildControls();
  buildImage();
  const first = DATA.detections.length ? DATA.detections[0].query : DATA.best.query;
  state.query = first;
  document.getElementById("query").value = first;
  state.node = DATA.graph[0].key;
  render();
  document.body.dataset.ready = "true";
}

function render() {
  renderImage();
  renderGraph();
  renderNode();
}

window.explore = { state, arrays: A, selectQuery, selectPixel, render, data: DATA };
main().catch((error) => {
  document.body.dataset.ready = "error";
  console.error(error);
});
