// slidekit view: the page behind `slidekit view PATH`.
// Routes: "#/" shows the cohort table (or the one slide PATH is); "#/item/<request path>" one slide.
// Everything comes from this server's /api, /dzi, /overlay, /thumb and /geojson routes.
"use strict";

const $ = (id) => document.getElementById(id);
// The state a test (or a curious user in the console) can look at.
const state = window.slidekitView = { info: null, item: null, viewer: null, overlay: null, layers: {},
                                      tilesLoaded: 0, ready: false };

function path(rel) { return rel.split("/").map(encodeURIComponent).join("/"); }

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) {
    let why = r.statusText;
    try { why = (await r.json()).error || why; } catch (e) { /* not JSON */ }
    throw new Error(`${url}: ${r.status} ${why}`);
  }
  return r.json();
}

function showError(e) {
  $("error").textContent = String(e.message || e);
  $("error").hidden = false;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// ---- the cohort table ------------------------------------------------------------------------

let cohortRows = [];
let sortBy = { column: null, up: true };

async function showCohort() {
  const data = await getJSON("/api/cohort");
  $("title").textContent = data.name;
  $("counts").textContent = `${data.rows.length} slides: ` +
    Object.entries(data.counts).map(([k, v]) => `${v} ${k}`).join(", ");
  cohortRows = data.rows;
  const columns = ["thumbnail", ...data.columns];
  const head = el("tr");
  for (const c of columns) {
    const th = el("th", {}, c);
    if (c !== "thumbnail") th.onclick = () => { sortTable(c); fillTable(columns); };
    head.append(th);
  }
  $("table").tHead.replaceChildren(head);
  fillTable(columns);
  $("cohort").hidden = false;
  state.ready = true;
}

function sortTable(column) {
  sortBy = { column, up: sortBy.column === column ? !sortBy.up : true };
  const num = (v) => (v === "" || isNaN(Number(v)) ? null : Number(v));
  cohortRows.sort((a, b) => {
    const x = a[column] ?? "", y = b[column] ?? "";
    const nx = num(x), ny = num(y);
    const c = nx !== null && ny !== null ? nx - ny : String(x).localeCompare(String(y));
    return sortBy.up ? c : -c;
  });
}

function fillTable(columns) {
  const body = $("table").tBodies[0];
  body.replaceChildren();
  for (const row of cohortRows) {
    const tr = el("tr", { class: row.status || "" });
    for (const c of columns) {
      const td = el("td", { class: c });
      if (c === "thumbnail") {
        if (row._thumb) td.append(el("img", { src: row._thumb, loading: "lazy", alt: row.id }));
      } else if (c === "id" && row._item) {
        td.append(el("a", { href: `#/item/${path(row._item)}` }, row.id));
      } else {
        td.textContent = row[c] ?? "";
      }
      tr.append(td);
    }
    body.append(tr);
  }
}

// ---- one slide -------------------------------------------------------------------------------

async function showItem(rel) {
  const item = await getJSON(`/api/item/${path(rel)}`);
  state.item = item;
  $("title").textContent = item.key;
  $("slide-name").textContent = item.slide_name;
  $("back").hidden = !item.cohort;
  showFacts(item);
  $("message").textContent = item.notes.join("; ");
  $("slide").hidden = false;
  if (state.viewer) state.viewer.destroy();
  state.overlay = null;
  state.layers = {};
  const viewer = state.viewer = OpenSeadragon({
    element: $("osd"), prefixUrl: "/static/openseadragon/images/", tileSources: item.dzi,
    showNavigator: true, navigatorPosition: "BOTTOM_RIGHT", maxZoomPixelRatio: 2,
    animationTime: 0.3, gestureSettingsMouse: { clickToZoom: false },
  });
  viewer.addHandler("tile-loaded", () => { state.tilesLoaded += 1; });
  viewer.addOnceHandler("open", () => {
    if (item.overlay) addOverlay(item); else state.ready = true;
    objectLayer.attach(viewer);
  });
  viewer.addHandler("open-failed", (e) => showError(`cannot open ${item.dzi}: ${e.message}`));
  showGeoJSONList(item);
}

function showFacts(item) {
  const facts = [["size", `${item.width} x ${item.height} px`],
                 ["pixel size", item.mpp ? `${item.mpp[0].toPrecision(4)} µm/px` : "unknown"]];
  for (const [k, v] of Object.entries(item.summary || {})) facts.push([k, Array.isArray(v) ? v.join(", ") : v]);
  $("facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function opacity() { return $("overlay-on").checked ? Number($("opacity").value) : 0; }

function addOverlay(item) {
  const meta = item.overlay_meta, W = item.width;
  // Viewport units: the slide is 1 wide; the PNG sits at its level-0 box.
  state.viewer.addTiledImage({
    tileSource: { type: "image", url: item.overlay }, x: meta.place.x / W, y: meta.place.y / W,
    width: meta.place.width / W, opacity: opacity(),
    success: (e) => { state.overlay = e.item; state.ready = true; },
    error: (e) => showError(`cannot load the overlay: ${e.message}`),
  });
  drawLegend(meta.legend);
  $("heatmap-controls").hidden = false;
}

function updateOverlay() { if (state.overlay) state.overlay.setOpacity(opacity()); }

function drawLegend(info) {
  const box = $("legend");
  box.replaceChildren();
  if (info.kind === "colorbar") {
    box.append(el("div", {}, info.label));
    const ramp = el("div", { class: "ramp" });
    ramp.style.background = `linear-gradient(to right, ${info.ramp.join(", ")})`;
    const [lo, hi] = info.range;
    box.append(ramp, el("div", { class: "ramp-labels" }, el("span", {}, lo), el("span", {}, hi)));
    if (info.observed) box.append(el("div", {}, `this slide: ${info.observed[0]} – ${info.observed[1]}`));
  } else {
    for (const c of info.classes) {
      const sw = el("span", { class: "swatch" });
      sw.style.background = c.css;
      box.append(el("div", {}, sw, c.name));
    }
    box.append(el("div", {}, `${info.uncoloured}: uncoloured`));
  }
  box.append(el("div", {}, `${info.task === "qc" ? "QC map" : "heatmap"} pixel: ${info.heatmap_mpp} µm`));
}

// ---- GeoJSON objects: drawn on a canvas over the viewer, redrawn as it moves -------------------

function showGeoJSONList(item) {
  const list = $("geojson-list");
  list.replaceChildren();
  for (const g of item.geojson) {
    const box = el("input", { type: "checkbox", "data-name": g.name });
    box.onchange = () => toggleLayer(g, box.checked).catch(showError);
    list.append(el("li", {}, el("label", {}, box, ` ${g.name} (${Math.ceil(g.bytes / 1024)} KiB)`)));
  }
  $("geojson-controls").hidden = item.geojson.length === 0;
}

async function toggleLayer(g, on) {
  if (on && !state.layers[g.name]) {
    $("message").textContent = `loading ${g.name}…`;
    const data = await getJSON(g.url);
    const features = Array.isArray(data) ? data : data.type === "Feature" ? [data] : data.features || [];
    state.layers[g.name] = { shapes: features.map(shapeOf).filter(Boolean), on: true };
    $("message").textContent = `${g.name}: ${features.length} objects`;
  }
  if (state.layers[g.name]) state.layers[g.name].on = on;
  objectLayer.draw();
}

// A feature as {rings: [[x, y, ...], ...], points, color, box} in level-0 pixels.
function shapeOf(f) {
  const g = f && f.geometry;
  if (!g) return null;
  const p = f.properties || {};
  const rgb = (p.classification && p.classification.color) || p.color || [255, 200, 0];
  const color = Array.isArray(rgb) ? `rgb(${rgb[0]},${rgb[1]},${rgb[2]})` : String(rgb);
  const rings = [], points = [];
  const line = (coords) => rings.push(coords.flat());
  const walk = { Polygon: (c) => c.forEach(line), MultiPolygon: (c) => c.forEach((poly) => poly.forEach(line)),
                 LineString: line, MultiLineString: (c) => c.forEach(line),
                 Point: (c) => points.push(c), MultiPoint: (c) => c.forEach((q) => points.push(q)) };
  const geoms = g.type === "GeometryCollection" ? g.geometries : [g];
  for (const one of geoms) if (walk[one.type]) walk[one.type](one.coordinates);
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const r of [...rings, points.flat()]) {
    for (let i = 0; i < r.length; i += 2) {
      x0 = Math.min(x0, r[i]); x1 = Math.max(x1, r[i]); y0 = Math.min(y0, r[i + 1]); y1 = Math.max(y1, r[i + 1]);
    }
  }
  return { rings, points, color, box: [x0, y0, x1, y1], closed: g.type.includes("Polygon") };
}

const objectLayer = {
  canvas: null, viewer: null,
  attach(viewer) {
    this.viewer = viewer;
    this.canvas = el("canvas");
    Object.assign(this.canvas.style, { position: "absolute", left: 0, top: 0, pointerEvents: "none" });
    viewer.canvas.append(this.canvas);
    for (const ev of ["update-viewport", "resize", "animation-finish"]) viewer.addHandler(ev, () => this.draw());
    this.draw();
  },
  draw() {
    const v = this.viewer, c = this.canvas;
    if (!v || !c || !v.world.getItemAt(0)) return;
    const dpr = window.devicePixelRatio || 1, w = v.canvas.clientWidth, h = v.canvas.clientHeight;
    if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.style.width = `${w}px`; }
    if (c.height !== Math.round(h * dpr)) { c.height = Math.round(h * dpr); c.style.height = `${h}px`; }
    const ctx = c.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, c.width, c.height);
    // level-0 px -> screen px: one scale and offset (the viewer does not rotate here)
    const ti = v.world.getItemAt(0), W = state.item.width;
    const a = ti.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    const b = ti.imageToViewerElementCoordinates(new OpenSeadragon.Point(W, W));
    const k = (b.x - a.x) / W;
    const view = [-a.x / k, -a.y / k, (w - a.x) / k, (h - a.y) / k];  // the visible level-0 box
    ctx.setTransform(k * dpr, 0, 0, k * dpr, a.x * dpr, a.y * dpr);
    ctx.lineWidth = 1.5 / k;
    for (const layer of Object.values(state.layers)) {
      if (!layer.on) continue;
      for (const s of layer.shapes) {
        const [x0, y0, x1, y1] = s.box;
        if (x1 < view[0] || y1 < view[1] || x0 > view[2] || y0 > view[3]) continue;
        ctx.strokeStyle = ctx.fillStyle = s.color;
        if ((x1 - x0) * k < 2 && (y1 - y0) * k < 2) { ctx.fillRect(x0, y0, 2 / k, 2 / k); continue; }
        ctx.beginPath();
        for (const r of s.rings) {
          ctx.moveTo(r[0], r[1]);
          for (let i = 2; i < r.length; i += 2) ctx.lineTo(r[i], r[i + 1]);
          if (s.closed) ctx.closePath();
        }
        ctx.stroke();
        for (const [x, y] of s.points) ctx.fillRect(x - 2 / k, y - 2 / k, 4 / k, 4 / k);
      }
    }
  },
};

// ---- routing -----------------------------------------------------------------------------------

async function route() {
  $("error").hidden = true;
  $("cohort").hidden = $("slide").hidden = true;
  state.ready = false;
  const m = location.hash.match(/^#\/item\/(.+)$/);
  if (m) return showItem(decodeURIComponent(m[1]));
  if (state.info.mode === "cohort") return showCohort();
  return showItem(state.info.item);
}

async function boot() {
  $("overlay-on").onchange = updateOverlay;
  $("opacity").oninput = updateOverlay;
  state.info = await getJSON("/api/info");
  $("home").hidden = state.info.mode !== "cohort";
  window.addEventListener("hashchange", () => route().catch(showError));
  await route();
}

boot().catch(showError);
