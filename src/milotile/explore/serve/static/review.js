// milotile review page: a keyboard-first queue of picks (thumbnails of three orthogonal slices),
// a tomogram slice view with the picks as circles, and verdicts stored by the server as they are made.
"use strict";
(function () {
  const R = (window.review = { ready: false, error: null, pos: 0, verdicts: new Map(), added: [], lastThumbMs: null,
                               thumbMs: [], keyMs: [], keyT: null, estimate: null, exported: undefined });
  const $ = (id) => document.getElementById(id);
  let meta = null, q = null, n = 0, tomoRows = [], undoStack = [];
  const cache = new Map(); // pick -> {img, t0}
  let slice = { ti: 0, z: 0, token: 0 };

  function fail(msg) { $("status").textContent = msg; R.error = msg; }
  async function getJSON(url) {
    const r = await fetch(url);
    if (!r.ok) throw new Error(`${url}: ${r.status} ${await r.text()}`);
    return r.json();
  }
  async function post(url, body) {
    const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error || r.status);
    return j;
  }
  const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(0) + "%");

  // ---------------------------------------------------------------- thumbnails (prefetched)
  function thumb(pick) {
    let c = cache.get(pick);
    if (!c) {
      const img = new Image();
      img.decoding = "sync";
      c = { img, done: new Promise((res) => { img.onload = res; img.onerror = res; }) };
      img.src = `/review/thumb/${pick}.png`;
      cache.set(pick, c);
      if (cache.size > 400) cache.delete(cache.keys().next().value);
    }
    return c;
  }
  function prefetch() {
    for (let k = 1; k <= 6 && R.pos + k < n; k++) thumb(q.order[R.pos + k]);
  }

  // ---------------------------------------------------------------- current pick
  function pickAt(pos) { return q.order[pos]; }
  function stateOf(pick) { const v = R.verdicts.get(pick); return v ? v.verdict : null; }

  async function show(pos) {
    if (!n) return;
    const t0 = performance.now();
    R.pos = Math.max(0, Math.min(n - 1, pos));
    const pick = pickAt(R.pos);
    const c = thumb(pick);
    prefetch();
    await c.done;
    if (pickAt(R.pos) !== pick) return; // moved on meanwhile
    $("curimg").replaceChildren(c.img);
    R.lastThumbMs = performance.now() - t0;
    R.thumbMs.push(R.lastThumbMs);
    if (R.keyT !== null) { R.keyMs.push(performance.now() - R.keyT); R.keyT = null; } // key press -> thumbnail shown
    R.shown = pick;
    const v = R.verdicts.get(pick), smp = q.sample[R.pos] === 1;
    $("current").className = (v ? v.verdict : "") + (smp ? " sample" : "");
    const tn = meta.tomograms[q.tomo[pick]].name;
    $("curinfo").innerHTML =
      `<div><b>${R.pos + 1}</b> / ${n} in the queue · pick ${pick}</div>` +
      `<div>score <b>${q.score[pick].toFixed(3)}</b> (threshold ${meta.threshold.toFixed(3)})</div>` +
      `<div>${tn} · x ${q.x[pick]} y ${q.y[pick]} z ${q.z[pick]}</div>` +
      `<div>${smp ? '<span class="badge sample">random sample</span>' : '<span class="badge">near threshold</span>'}` +
      (v ? `<span class="badge ${v.verdict}">${v.verdict}${v.reason ? " · " + v.reason : ""}</span>` : "") + "</div>";
    strip();
    goSlice(q.tomo[pick], Math.round(q.z[pick]));
  }

  function strip() {
    const el = $("strip"), out = [];
    const w = Math.max(1, Math.floor(el.clientWidth / 140));
    const a = Math.max(0, R.pos - 2);
    for (let k = a; k < Math.min(n, a + w); k++) {
      const pick = pickAt(k), img = document.createElement("img");
      img.src = thumb(pick).img.src;
      img.className = (stateOf(pick) || "") + (k === R.pos ? " cur" : "");
      img.title = `pick ${pick}, score ${q.score[pick].toFixed(3)}`;
      img.onclick = () => show(k);
      out.push(img);
    }
    el.replaceChildren(...out);
  }

  function nextOpen(from) {
    for (let k = from; k < n; k++) if (!R.verdicts.has(pickAt(k))) return k;
    return Math.min(from, n - 1);
  }

  // ---------------------------------------------------------------- verdicts
  async function decide(verdict, reason) {
    const pick = pickAt(R.pos), pos = R.pos;
    try {
      const j = await post("/api/review/verdict", { pick, verdict, reason: reason || "" });
      R.verdicts.set(pick, j.row);
      undoStack.push({ vid: j.row.vid, pos, pick });
      setEstimate(j.estimate);
      await show(nextOpen(pos + 1));
    } catch (e) { fail(String(e)); }
  }
  async function undo() {
    const last = undoStack.pop();
    try {
      const j = await post("/api/review/undo", { vid: last ? last.vid : null });
      if (j.row) {
        if (j.row.verdict === "add") R.added = R.added.filter((a) => a.vid !== j.row.vid);
        else R.verdicts.delete(j.row.pick);
      }
      setEstimate(j.estimate);
      if (last && last.pick >= 0) await show(last.pos); else { counts(); drawCircles(); }
    } catch (e) { fail(String(e)); }
  }
  async function addParticle(x, y, z) {
    const tn = meta.tomograms[slice.ti].name;
    try {
      const j = await post("/api/review/add", { tomogram: tn, x, y, z });
      R.added.push(j.row);
      undoStack.push({ vid: j.row.vid, pos: R.pos, pick: -1 });
      setEstimate(j.estimate);
      drawCircles();
    } catch (e) { fail(String(e)); }
  }

  function setEstimate(e) {
    R.estimate = e;
    counts();
    if (!e || !e.n_sample) { $("estimate").textContent = "no sample verdicts yet (purple = random sample)"; return; }
    const ci = (c) => `<span class="ci">[${pct(c[0])}–${pct(c[1])}]</span>`;
    let s = `<div>precision at ${e.threshold.toFixed(3)}: <b>${pct(e.precision)}</b> ${ci(e.precision_ci)}</div>` +
      `<div>recall (of reviewed-table particles): <b>${pct(e.recall)}</b> ${ci(e.recall_ci)}</div>` +
      `<div>${e.n_sample} sample verdicts · ${e.n_kept} picks kept` +
      (e.precision !== null ? ` · ≈${Math.round(e.n_kept * e.precision)} true` : "") + "</div>";
    const sg = e.suggested || {};
    s += sg.threshold !== undefined
      ? `<div>sample's threshold: <b>${sg.threshold.toFixed(3)}</b> (precision ${pct(sg.precision)}, recall ${pct(sg.recall)})</div>`
      : `<div class="ci">${sg.error || ""}</div>`;
    $("estimate").innerHTML = s;
  }
  function counts() {
    let a = 0, r = 0, s = 0;
    for (const v of R.verdicts.values()) { if (v.verdict === "accept") a++; else r++; if (v.sample) s++; }
    R.counts = { accept: a, reject: r, add: R.added.length, sample: s };
    $("counts").textContent = `${a} accepted · ${r} rejected · ${R.added.length} added · ${s} in the random sample` +
      ` → tables/${meta.tables.labels}, tables/${meta.tables.negatives}`;
  }

  // ---------------------------------------------------------------- slice view
  const canvas = $("circles"), ctx = canvas.getContext("2d");
  let disp = { w: 1, h: 1 };
  function layout() {
    const t = meta.tomograms[slice.ti], wrap = $("slicewrap").getBoundingClientRect();
    const [, H0, W0] = t.shape, k = Math.min(wrap.width / W0, wrap.height / H0);
    disp = { w: Math.max(1, Math.floor(W0 * k)), h: Math.max(1, Math.floor(H0 * k)), W0, H0 };
    for (const el of [$("sliceimg"), $("heatimg")]) { el.style.width = disp.w + "px"; el.style.height = disp.h + "px"; }
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(disp.w * dpr); canvas.height = Math.round(disp.h * dpr);
    canvas.style.width = disp.w + "px"; canvas.style.height = disp.h + "px";
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  }
  R.toScreen = (x, y) => [((x + 0.5) / disp.W0) * disp.w, ((y + 0.5) / disp.H0) * disp.h];
  R.toVoxel = (sx, sy) => [(sx / disp.w) * disp.W0 - 0.5, (sy / disp.h) * disp.H0 - 0.5];

  function goSlice(ti, z) {
    const t = meta.tomograms[ti];
    z = Math.max(0, Math.min(t.shape[0] - 1, z));
    const changed = ti !== slice.ti || z !== slice.z || !$("sliceimg").src;
    slice.ti = ti; slice.z = z;
    $("tomo").value = String(ti);
    $("z").max = String(t.shape[0] - 1); $("z").value = String(z); $("zval").textContent = String(z);
    if (changed) {
      const tok = ++slice.token;
      const img = new Image();
      img.onload = () => { if (tok === slice.token) { $("sliceimg").src = img.src; layout(); drawCircles(); R.sliceLoaded = `${ti}/${z}`; } };
      img.src = `/api/review/slice/${ti}/${z}.png`;
      if ($("heat").checked) $("heatimg").src = `/api/review/heatmap/${ti}/${z}.png`;
    }
    drawCircles();
  }
  function drawCircles() {
    ctx.clearRect(0, 0, disp.w, disp.h);
    if (!meta) return;
    const r0 = meta.box / 2, scale = disp.w / disp.W0, cur = n ? pickAt(R.pos) : -1;
    const circle = (x, y, z, col, w) => {
      const dz = Math.abs(z - slice.z);
      if (dz >= r0) return;
      const [sx, sy] = R.toScreen(x, y);
      ctx.strokeStyle = col; ctx.lineWidth = w; ctx.beginPath();
      ctx.arc(sx, sy, Math.max(2, Math.sqrt(r0 * r0 - dz * dz) * scale), 0, 2 * Math.PI); ctx.stroke();
    };
    for (const pick of tomoRows[slice.ti] || []) {
      const s = stateOf(pick);
      const col = pick === cur ? "#fd4" : s === "accept" ? "#3c6" : s === "reject" ? "#e44" :
        q.score[pick] >= meta.threshold ? "rgba(255,255,255,0.8)" : "rgba(150,150,150,0.6)";
      circle(q.x[pick], q.y[pick], q.z[pick], col, pick === cur ? 2.5 : 1.2);
    }
    const tn = meta.tomograms[slice.ti].name;
    for (const a of R.added) if (a.tomogram === tn) circle(a.x, a.y, a.z, "#4df", 2);
  }
  canvas.addEventListener("click", (ev) => {
    const b = canvas.getBoundingClientRect();
    const [x, y] = R.toVoxel(ev.clientX - b.left, ev.clientY - b.top);
    if ($("addmode").checked) { addParticle(x, y, slice.z); return; }
    let best = -1, bd = (meta.box / 2) ** 2;
    for (const pick of tomoRows[slice.ti] || []) {
      const d = (q.x[pick] - x) ** 2 + (q.y[pick] - y) ** 2 + (q.z[pick] - slice.z) ** 2;
      if (d < bd) { bd = d; best = pick; }
    }
    if (best >= 0) show(q.order.indexOf(best));
  });
  $("z").addEventListener("input", () => goSlice(slice.ti, +$("z").value));
  $("tomo").addEventListener("change", () => goSlice(+$("tomo").value, slice.z));
  $("heat").addEventListener("change", () => {
    $("heatimg").hidden = !$("heat").checked;
    if ($("heat").checked) $("heatimg").src = `/api/review/heatmap/${slice.ti}/${slice.z}.png`;
  });
  window.addEventListener("resize", () => { if (meta) { layout(); drawCircles(); strip(); } });

  // ---------------------------------------------------------------- keyboard
  document.addEventListener("keydown", (ev) => {
    if (!R.ready || ev.target.tagName === "INPUT" && ev.target.type !== "checkbox" && ev.target.type !== "range" ||
        ev.target.tagName === "SELECT") return;
    const k = ev.key;
    R.keyT = ev.timeStamp;
    if (k === "y") decide("accept");
    else if (k === "n") decide("reject", $("reason").value);
    else if (k >= "1" && k <= "4") decide("reject", meta.reasons[+k - 1]);
    else if (k === "u") undo();
    else if (k === "ArrowRight") show(R.pos + 1);
    else if (k === "ArrowLeft") show(R.pos - 1);
    else if (k === "ArrowUp") goSlice(slice.ti, slice.z + 1);
    else if (k === "ArrowDown") goSlice(slice.ti, slice.z - 1);
    else if (k === "PageUp") goSlice(slice.ti, slice.z + 10);
    else if (k === "PageDown") goSlice(slice.ti, slice.z - 10);
    else if (k === "h") { $("heat").checked = !$("heat").checked; $("heat").dispatchEvent(new Event("change")); }
    else if (k === "a") $("addmode").checked = !$("addmode").checked;
    else return;
    ev.preventDefault();
  });

  // ---------------------------------------------------------------- export
  $("export").addEventListener("click", async () => {
    try {
      const j = await post("/api/review/export", {});
      R.exported = j;
      $("exported").innerHTML = Object.entries(j).map(([kind, v]) =>
        `<div>${kind} (${v.n}, tables/${v.table}): ` +
        Object.entries(v.downloads).map(([f, u]) => `<a href="${u}">${f}</a>`).join(" ") + "</div>").join("");
    } catch (e) { fail(String(e)); }
  });

  // ---------------------------------------------------------------- start
  async function start() {
    const t0 = performance.now();
    try {
      meta = await getJSON("/api/review/meta");
      const [queue, verdicts, est] = await Promise.all([getJSON("/api/review/queue"), getJSON("/api/review/verdicts"),
                                                          getJSON("/api/review/estimate")]);
      q = queue; n = q.order.length; R.n = n;
      tomoRows = meta.tomograms.map(() => []);
      for (let i = 0; i < n; i++) tomoRows[q.tomo[i]].push(i);
      for (const v of verdicts) { if (v.verdict === "add") R.added.push(v); else R.verdicts.set(v.pick, v); }
      $("tomo").replaceChildren(...meta.tomograms.map((t, i) => new Option(`${t.name} (${t.n_picks})`, String(i))));
      $("reason").append(...meta.reasons.map((r) => new Option(r, r)));
      $("reasonkeys").textContent = meta.reasons.map((r, i) => `${i + 1} ${r}`).join(", ");
      $("heat").disabled = !meta.heatmaps;
      fetch("/api/meta").then((r) => { if (r.ok) $("atlaslink").hidden = false; });
      $("status").textContent = `${n} picks of ${meta.table}` + (meta.run ? ` (run ${meta.run})` : "") +
        ` · box ${meta.box} voxels · reviewer ${meta.who}`;
      setEstimate(est);
      if (n) await show(nextOpen(0)); else { layout(); goSlice(0, 0); }
      R.loadMs = performance.now() - t0;
      R.ready = true;
    } catch (e) { fail(String(e)); }
  }
  start();
})();
