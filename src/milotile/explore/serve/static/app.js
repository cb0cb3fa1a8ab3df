// milotile atlas selection app: a small WebGL2 point renderer (no build step, no library).
// The server computes selections; this page sends the drawn polygon/box and the visible clusters.
"use strict";
(function () {
  const M = (window.milotile = { ready: false, firstPaintMs: null, lastSelectMs: null, selection: null });
  const gl = document.getElementById("gl").getContext("webgl2", { antialias: false, preserveDrawingBuffer: true });
  const overlay = document.getElementById("overlay");
  const ctx = overlay.getContext("2d");
  const $ = (id) => document.getElementById(id);
  let meta = null, n = 0, nPal = 1;
  let view = { cx: 0.5, cy: 0.5, k: 500 }; // map centre and CSS pixels per map unit
  let visible = null; // Uint8Array over palette index (0 = unassigned)
  let selGeom = null, selId = null, prog = null, palTex = null, selBuf = null, selBytes = null;
  let mode = "lasso", drag = null, W = 1, H = 1;

  function fail(msg) { $("status").textContent = msg; M.error = msg; }
  if (!gl) { fail("WebGL2 is not available in this browser"); return; }

  const VS = `#version 300 es
  layout(location=0) in vec3 aPos; layout(location=1) in float aSel;
  uniform vec2 uC; uniform vec2 uK; uniform float uSize; uniform bool uHasSel;
  uniform sampler2D uPal;
  out vec4 vCol;
  void main() {
    vec4 c = texelFetch(uPal, ivec2(int(aPos.z + 0.5), 0), 0);
    if (c.a < 0.5) { gl_Position = vec4(2.0, 2.0, 2.0, 1.0); gl_PointSize = 0.0; vCol = vec4(0.0); return; }
    gl_Position = vec4((aPos.xy - uC) * uK, 0.0, 1.0);
    bool s = aSel > 0.5;
    gl_PointSize = (uHasSel && s) ? uSize + 2.0 : uSize;
    vCol = (uHasSel && !s) ? vec4(c.rgb * 0.35, 1.0) : vec4(c.rgb, 1.0);
  }`;
  const FS = `#version 300 es
  precision mediump float; in vec4 vCol; out vec4 o;
  void main() { vec2 d = gl_PointCoord - 0.5; if (dot(d, d) > 0.25) discard; o = vCol; }`;

  function shader(type, src) {
    const s = gl.createShader(type); gl.shaderSource(s, src); gl.compileShader(s);
    if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s));
    return s;
  }
  function program() {
    const p = gl.createProgram();
    gl.attachShader(p, shader(gl.VERTEX_SHADER, VS)); gl.attachShader(p, shader(gl.FRAGMENT_SHADER, FS));
    gl.linkProgram(p);
    if (!gl.getProgramParameter(p, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(p));
    return p;
  }
  function hexRGB(h) { return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)); }

  function uploadPalette() {
    const px = new Uint8Array(nPal * 4);
    for (const c of meta.clusters) {
      const i = c.id + 1, rgb = hexRGB(c.color);
      px.set([rgb[0], rgb[1], rgb[2], visible[i] ? 255 : 0], i * 4);
    }
    gl.bindTexture(gl.TEXTURE_2D, palTex);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA8, nPal, 1, 0, gl.RGBA, gl.UNSIGNED_BYTE, px);
  }

  function resize() {
    const r = overlay.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    W = Math.max(1, r.width); H = Math.max(1, r.height);
    for (const c of [gl.canvas, overlay]) { c.width = Math.round(W * dpr); c.height = Math.round(H * dpr); }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    gl.viewport(0, 0, gl.canvas.width, gl.canvas.height);
  }
  function fit() {
    const [x0, y0, x1, y1] = meta.bounds;
    view.cx = (x0 + x1) / 2; view.cy = (y0 + y1) / 2;
    view.k = 0.92 * Math.min(W / Math.max(x1 - x0, 1e-9), H / Math.max(y1 - y0, 1e-9));
  }
  // map <-> screen (CSS pixels; screen y grows downwards)
  M.dataToScreen = (x, y) => [W / 2 + (x - view.cx) * view.k, H / 2 - (y - view.cy) * view.k];
  M.screenToData = (px, py) => [view.cx + (px - W / 2) / view.k, view.cy - (py - H / 2) / view.k];

  function draw() {
    gl.clearColor(0.07, 0.07, 0.07, 1); gl.clear(gl.COLOR_BUFFER_BIT);
    if (!n) return;
    gl.useProgram(prog);
    gl.uniform2f(gl.getUniformLocation(prog, "uC"), view.cx, view.cy);
    gl.uniform2f(gl.getUniformLocation(prog, "uK"), 2 * view.k / W, 2 * view.k / H);
    gl.uniform1f(gl.getUniformLocation(prog, "uSize"), n > 200000 ? 2.0 : n > 20000 ? 3.0 : 5.0);
    gl.uniform1i(gl.getUniformLocation(prog, "uHasSel"), selId ? 1 : 0);
    gl.activeTexture(gl.TEXTURE0); gl.bindTexture(gl.TEXTURE_2D, palTex);
    gl.uniform1i(gl.getUniformLocation(prog, "uPal"), 0);
    gl.drawArrays(gl.POINTS, 0, n);
  }
  let pending = false;
  function redraw() { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(); }); } }

  function drawOverlay(path) {
    ctx.clearRect(0, 0, W, H);
    if (!path || path.length < 2) return;
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 1.5; ctx.setLineDash([5, 3]);
    ctx.beginPath(); ctx.moveTo(path[0][0], path[0][1]);
    for (const p of path.slice(1)) ctx.lineTo(p[0], p[1]);
    ctx.closePath(); ctx.stroke();
  }

  function visibleClusters() { return meta.clusters.filter((c) => visible[c.id + 1]).map((c) => c.id); }

  async function runSelection() {
    if (!selGeom) return;
    const t0 = performance.now();
    const body = Object.assign({ clusters: visibleClusters() }, selGeom);
    const r = await fetch("/api/select", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const info = await r.json();
    if (info.error) { fail(info.error); return; }
    const ids = new Uint32Array(await (await fetch(`/api/selection/${info.selection}.bin`)).arrayBuffer());
    selBytes.fill(0);
    for (let i = 0; i < ids.length; i++) selBytes[ids[i]] = 1;
    gl.bindBuffer(gl.ARRAY_BUFFER, selBuf); gl.bufferSubData(gl.ARRAY_BUFFER, 0, selBytes);
    selId = info.selection;
    draw();
    gl.finish();
    M.lastSelectMs = performance.now() - t0;
    M.selection = { id: info.selection, n: info.n, per_tomogram: info.per_tomogram, per_cluster: info.per_cluster };
    showCounts(info);
    $("export").disabled = false;
  }

  function showCounts(info) {
    const label = (head, k) => (head === "cluster" && k === "-1" ? "unassigned" : `${head} ${k}`);
    const rows = (obj, head) => Object.entries(obj).map(([k, v]) => `<tr><td>${label(head, k)}</td><td>${v}</td></tr>`).join("");
    $("selinfo").innerHTML = `<b>${info.n}</b> points<table>${rows(info.per_cluster, "cluster")}${rows(info.per_tomogram, "")}</table>`;
  }

  function clearSelection() {
    selGeom = null; selId = null; M.selection = null;
    if (selBytes) { selBytes.fill(0); gl.bindBuffer(gl.ARRAY_BUFFER, selBuf); gl.bufferSubData(gl.ARRAY_BUFFER, 0, selBytes); }
    $("selinfo").textContent = "nothing selected"; $("export").disabled = true; drawOverlay(null); redraw();
  }

  function buildClusterList() {
    const box = $("clusters"); box.innerHTML = "";
    for (const c of meta.clusters) {
      const row = document.createElement("label"); row.className = "cl";
      const name = c.id < 0 ? "unassigned" : `cluster ${c.id}`;
      row.innerHTML = `<input type="checkbox" data-cluster="${c.id}" checked><span class="sw" style="background:${c.color}"></span>${name}<span class="n">${c.count}</span>`;
      row.querySelector("input").addEventListener("change", (e) => {
        visible[c.id + 1] = e.target.checked ? 1 : 0; uploadPalette(); redraw(); runSelection();
      });
      box.appendChild(row);
    }
  }
  function setAll(on) {
    for (const inp of document.querySelectorAll("#clusters input")) inp.checked = on;
    visible.fill(on ? 1 : 0); uploadPalette(); redraw(); runSelection();
  }

  // -- hover -------------------------------------------------------------------------------
  let hoverTimer = null;
  function hover(ev) {
    if (hoverTimer) clearTimeout(hoverTimer);
    hoverTimer = setTimeout(async () => {
      const [x, y] = M.screenToData(ev.offsetX, ev.offsetY);
      const r = 6 / view.k;
      const p = await (await fetch(`/api/nearest?x=${x}&y=${y}&r=${r}`)).json();
      const el = $("hover");
      if (!p.id && p.id !== 0) { el.hidden = true; return; }
      if (!visible[p.cluster + 1]) { el.hidden = true; return; }
      if (meta.thumbnails) { $("thumb").src = p.thumb; $("thumb").hidden = false; } else { $("thumb").hidden = true; }
      $("hovertext").textContent = `#${p.id} ${p.tomogram ?? ""} (${p.x}, ${p.y}, ${p.z}) cluster ${p.cluster}`;
      el.style.left = `${ev.offsetX + 14}px`; el.style.top = `${ev.offsetY + 14}px`; el.hidden = false;
    }, 60);
  }

  // -- pointer interaction -------------------------------------------------------------------
  overlay.addEventListener("mousedown", (ev) => {
    $("hover").hidden = true;
    drag = { x: ev.offsetX, y: ev.offsetY, path: [[ev.offsetX, ev.offsetY]], cx: view.cx, cy: view.cy };
  });
  overlay.addEventListener("mousemove", (ev) => {
    if (!drag) { hover(ev); return; }
    if (mode === "pan") {
      view.cx = drag.cx - (ev.offsetX - drag.x) / view.k; view.cy = drag.cy + (ev.offsetY - drag.y) / view.k; redraw();
    } else if (mode === "box") {
      drag.path = [[drag.x, drag.y], [ev.offsetX, drag.y], [ev.offsetX, ev.offsetY], [drag.x, ev.offsetY]]; drawOverlay(drag.path);
    } else {
      drag.path.push([ev.offsetX, ev.offsetY]); drawOverlay(drag.path);
    }
  });
  window.addEventListener("mouseup", (ev) => {
    if (!drag) return;
    const d = drag; drag = null;
    if (mode === "pan") return;
    if (mode === "box" && d.path.length === 4) {
      const a = M.screenToData(d.path[0][0], d.path[0][1]), b = M.screenToData(d.path[2][0], d.path[2][1]);
      selGeom = { box: [a[0], a[1], b[0], b[1]] };
    } else if (mode === "lasso" && d.path.length >= 3) {
      selGeom = { polygon: d.path.map((p) => M.screenToData(p[0], p[1])) };
    } else { return; }
    runSelection();
  });
  overlay.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const [x, y] = M.screenToData(ev.offsetX, ev.offsetY), f = Math.exp(-ev.deltaY * 0.0015);
    view.k *= f; view.cx = x - (x - view.cx) / f; view.cy = y - (y - view.cy) / f;
    drawOverlay(selGeom ? null : null); redraw();
  }, { passive: false });
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", (e) => { mode = e.target.value; });
  $("reset").addEventListener("click", () => { fit(); redraw(); });
  $("clear").addEventListener("click", clearSelection);
  $("all").addEventListener("click", () => setAll(true));
  $("none").addEventListener("click", () => setAll(false));
  $("export").addEventListener("click", async () => {
    if (!selId) return;
    const r = await fetch("/api/export", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ selection: selId, name: $("name").value }) });
    const out = await r.json();
    if (out.error) { $("exported").textContent = out.error; return; }
    M.exported = out;
    $("exported").innerHTML = `saved <b>${out.n}</b> labels as tables/${out.table}.parquet<br>` +
      Object.entries(out.downloads).map(([f, u]) => `<a href="${u}" download>${f}</a>`).join(" · ");
  });
  window.addEventListener("resize", () => { resize(); redraw(); });

  async function start() {
    const t0 = performance.now();
    meta = await (await fetch("/api/meta")).json();
    $("key").textContent = meta.key;
    $("reviewlink").hidden = !meta.review;
    const buf = new Float32Array(await (await fetch("/api/points.bin")).arrayBuffer());
    n = buf.length / 3;
    nPal = Math.max(1, ...meta.clusters.map((c) => c.id + 2));
    visible = new Uint8Array(nPal).fill(1);
    prog = program();
    const vao = gl.createVertexArray(); gl.bindVertexArray(vao);
    const pos = gl.createBuffer(); gl.bindBuffer(gl.ARRAY_BUFFER, pos); gl.bufferData(gl.ARRAY_BUFFER, buf, gl.STATIC_DRAW);
    gl.enableVertexAttribArray(0); gl.vertexAttribPointer(0, 3, gl.FLOAT, false, 12, 0);
    selBytes = new Uint8Array(n);
    selBuf = gl.createBuffer(); gl.bindBuffer(gl.ARRAY_BUFFER, selBuf); gl.bufferData(gl.ARRAY_BUFFER, selBytes, gl.DYNAMIC_DRAW);
    gl.enableVertexAttribArray(1); gl.vertexAttribPointer(1, 1, gl.UNSIGNED_BYTE, false, 1, 0);
    palTex = gl.createTexture(); gl.bindTexture(gl.TEXTURE_2D, palTex);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.NEAREST); gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
    uploadPalette(); buildClusterList();
    resize(); fit(); draw(); gl.finish();
    M.firstPaintMs = performance.now() - t0;
    M.n = n; M.ready = true;
    $("status").textContent = `${n.toLocaleString()} points · ${meta.clusters.length} clusters · ${meta.tomograms.length} tomograms`;
  }
  start().catch((e) => fail(String(e)));
})();
