"""The page at ``/``: drop an image, see the top-k classes with probabilities and the latency.

One self-contained HTML document (inline CSS and JavaScript, no external assets, no
fonts or scripts from elsewhere), so it works offline and behind a firewall. It talks to
the same ``/v1`` API as any client.
"""

from __future__ import annotations

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>transfer serve</title>
<style>
  :root { --fg:#1d2330; --muted:#5d6778; --line:#d8dde6; --accent:#2f6fde; --bad:#c2362b; --bg:#f6f7f9; }
  * { box-sizing: border-box; }
  body { margin:0; font:15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg);
         background:var(--bg); }
  main { max-width: 760px; margin: 0 auto; padding: 24px 16px 48px; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  .muted { color: var(--muted); font-size: 13px; }
  #drop { display: block; margin-top: 16px; border: 2px dashed var(--line); border-radius: 10px; background: #fff; padding: 28px;
          text-align: center; cursor: pointer; transition: border-color .15s; }
  #drop.over { border-color: var(--accent); }
  #drop input { display: none; }
  #preview { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; display: none;
              margin: 12px auto 0; border-radius: 6px; }
  #key { width: 100%; padding: 6px 8px; border: 1px solid var(--line); border-radius: 6px; margin-top: 4px; }
  .keyrow { margin-top: 14px; display: none; }
  #result { margin-top: 18px; background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px;
            display: none; }
  table { width: 100%; border-collapse: collapse; }
  td { padding: 5px 4px; border-bottom: 1px solid var(--line); vertical-align: middle; }
  td.cls { width: 35%; } td.p { width: 90px; text-align: right; font-variant-numeric: tabular-nums; }
  .bar { height: 10px; background: var(--accent); border-radius: 5px; min-width: 2px; }
  .err { color: var(--bad); }
  #timing { margin-top: 10px; }
  .camrow { margin-top: 10px; display: none; }
  #camfig { display: none; margin: 12px 0 0 0; }
  #camimg { max-width: 100%; image-rendering: pixelated; border-radius: 6px; }
</style>
</head>
<body>
<main>
  <h1>transfer serve</h1>
  <div class="muted" id="model">loading model information...</div>
  <div class="keyrow" id="keyrow"><label class="muted" for="key">API key (sent as a Bearer token; kept in this
    page only)</label><input id="key" type="password" autocomplete="off"></div>
  <label id="drop" for="file">
    <div><strong>Drop an image here</strong> or click to choose one</div>
    <div class="muted">JPEG, PNG, BMP, WebP or TIFF</div>
    <input id="file" type="file" accept="image/*">
    <img id="preview" alt="">
  </label>
  <div class="camrow" id="camrow"><label><input id="cam" type="checkbox"> show where the model looks
    (class activation map of the predicted class)</label></div>
  <div id="result">
    <div id="name" class="muted"></div>
    <table id="top"><tbody></tbody></table>
    <div id="timing" class="muted"></div>
    <figure id="camfig"><img id="camimg" alt="class activation map"><figcaption id="camcap" class="muted">
      </figcaption></figure>
  </div>
</main>
<script>
"use strict";
const AUTH = __AUTH__;
const $ = (id) => document.getElementById(id);
if (AUTH) { $("keyrow").style.display = "block"; }
function headers() {
  const k = $("key").value.trim();
  return k ? {"Authorization": "Bearer " + k} : {};
}
function text(el, s) { el.textContent = s; }
async function loadModel() {
  try {
    const r = await fetch("/v1/model", {headers: headers()});
    const j = await r.json();
    if (!r.ok) { text($("model"), j.error + (AUTH ? " (enter the API key, then drop an image)" : "")); return; }
    const s = j.serving || {};
    if (j.cam && j.cam.available) { $("camrow").style.display = "block"; }
    text($("model"), `${j.num_classes} classes, input ${j.input.height}x${j.input.width}; ` +
         `${s.backend} on ${s.provider}, head ${s.head}; bundle ${j.bundle_id.slice(0, 19)}...`);
  } catch (e) { text($("model"), "cannot reach the server: " + e); }
}
function show(file) {
  if (!file) return;
  const url = URL.createObjectURL(file);
  $("preview").src = url; $("preview").style.display = "block";
  predict(file);
}
async function predict(file) {
  const body = new FormData();
  body.append("image", file, file.name);
  const box = $("result"), tb = document.querySelector("#top tbody");
  box.style.display = "block"; tb.innerHTML = ""; text($("timing"), "");
  $("camfig").style.display = "none"; $("camimg").removeAttribute("src");
  const cam = $("cam").checked;
  text($("name"), file.name + ": predicting...");
  const t0 = performance.now();
  let r, j;
  try {
    r = await fetch("/v1/predict" + (cam ? "?cam=1" : ""), {method: "POST", body, headers: headers()});
    j = await r.json();
  } catch (e) { text($("name"), "request failed: " + e); $("name").className = "err"; return; }
  const ms = performance.now() - t0;
  if (!r.ok) {
    $("name").className = "err";
    text($("name"), `${file.name}: ${r.status} ${j.error}` + (j.hint ? ` (${j.hint})` : ""));
    if (r.status === 401) loadModel();
    return;
  }
  $("name").className = "muted";
  const p = j.predictions[0];
  text($("name"), `${p.name}: ${p.top[0].class}`);
  for (const t of p.top) {
    const tr = document.createElement("tr");
    const c = document.createElement("td"); text(c, t.class); c.className = "cls";
    const b = document.createElement("td"); const bar = document.createElement("div");
    bar.className = "bar"; bar.style.width = (100 * t.prob).toFixed(1) + "%"; b.appendChild(bar);
    const v = document.createElement("td"); v.className = "p"; text(v, (100 * t.prob).toFixed(2) + " %");
    tr.append(c, b, v); tb.appendChild(tr);
  }
  const tm = p.timings_ms;
  text($("timing"), `latency ${ms.toFixed(1)} ms in the browser; server ${j.timings_ms.total.toFixed(1)} ms ` +
       `(decode ${tm.decode.toFixed(2)}, queue ${tm.queue.toFixed(2)}, model ${tm.model.toFixed(2)} ms, ` +
       `batch of ${p.batch_size})`);
  $("timing").dataset.ms = ms.toFixed(3);
  if (p.cam) {
    $("camimg").src = "data:image/png;base64," + p.cam.png;
    text($("camcap"), `map of ${p.cam.class} (${p.cam.head} head, layer ${p.cam.layer}, ` +
         `${p.cam.cells.length}x${p.cam.cells[0].length} cells)` + (p.cam.flag ? `: ${p.cam.flag} map` : "") +
         ` in ${tm.cam.toFixed(1)} ms`);
    $("camfig").style.display = "block";
  }
}
const drop = $("drop");
["dragenter", "dragover"].forEach(ev => drop.addEventListener(ev, e => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach(ev => drop.addEventListener(ev, e => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", e => show(e.dataTransfer.files[0]));
$("file").addEventListener("change", e => show(e.target.files[0]));
$("key").addEventListener("change", loadModel);
$("cam").addEventListener("change", () => { const f = $("file").files[0]; if (f) predict(f); });
loadModel();
</script>
</body>
</html>
"""


def page_html(*, auth: bool) -> str:
    """The page; with ``auth`` it shows a field for the API key."""
    return _PAGE.replace("__AUTH__", "true" if auth else "false")


__all__ = ["page_html"]
