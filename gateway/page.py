"""``GET /``: a small read-only page listing runs, ranks and their state.

Plain HTML and ``fetch``, no build step. It holds no data: the page asks the API (with the
bearer token typed into it, if the gateway needs one; kept in sessionStorage only).
"""

from __future__ import annotations

from typing import Final

from fastapi import APIRouter
from starlette.responses import HTMLResponse

__all__ = ["PAGE", "router"]

router = APIRouter()

PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>runctl</title>
<style>
 body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
 h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.5em}
 table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.3em .6em;
 text-align:left;vertical-align:top} th{background:#f4f4f4}
 pre{margin:0;font-size:12px;max-width:60em;white-space:pre-wrap;word-break:break-all}
 .alive{color:#080}.stalled{color:#c00;font-weight:bold}.stale{color:#b60}.exited{color:#888}
 #err{color:#b00}
 #bar{display:flex;gap:1em;align-items:center} small{color:#666}
</style></head><body>
<div id="bar"><h1>runctl</h1><small><a href="/docs">API docs</a></small>
<small>token (if the gateway needs one): <input id="tok" type="password" size="30"></small>
<small id="when"></small></div>
<div id="err"></div><div id="runs">loading...</div>
<script>
const tok = document.getElementById('tok');
tok.value = sessionStorage.getItem('runctl-token') || '';
tok.onchange = () => { sessionStorage.setItem('runctl-token', tok.value); refresh(); };
const esc = s => String(s).replace(/[&<>"']/g,
  c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
async function api(path) {
  const headers = tok.value ? {Authorization: 'Bearer ' + tok.value} : {};
  const r = await fetch(path, {headers});
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error((body && (body.message || body.detail)) || r.statusText);
  return body;
}
async function refresh() {
  const err = document.getElementById('err');
  try {
    const data = await api('/runs');
    let html = data.runs.length ? '' : '<p>No runs yet.</p>';
    for (const run of data.runs) {
      const r = encodeURIComponent(run.run);
      const c = run.counts, lag = run.spread && run.spread.summary;
      html += `<h2>${esc(run.run)} <small>${c.alive} alive, ${c.stalled || 0} stalled,` +
              ` ${c.stale} stale, ${c.exited} exited</small></h2>` +
              (run.spread && Object.keys(run.spread.behind).length
                ? `<p class="stalled">${esc(lag)}</p>` : '') +
              `<table><tr><th>rank</th><th>status</th><th>version</th><th>step</th>` +
              `<th>advanced</th><th>heartbeat</th><th>host/pid</th><th>state</th></tr>`;
      const states = await api(`/runs/${r}/ranks/all/get`).catch(() => ({ranks: {}}));
      for (const k of run.ranks) {
        const st = states.ranks[k.rank];
        const value = st && st.value !== undefined ? JSON.stringify(st.value, null, 1) : '';
        html += `<tr><td>${esc(k.rank)}</td><td class="${esc(k.status)}">${esc(k.status)}` +
                `</td><td>${k.version}</td><td>${k.step ?? ''}</td>` +
                `<td>${k.idle_s == null ? '' : k.idle_s.toFixed(1) + ' s ago'}</td>` +
                `<td>${k.heartbeat_age_s.toFixed(1)} s ago</td>` +
                `<td>${esc(k.host)}/${k.pid}</td><td><pre>${esc(value)}</pre></td></tr>`;
      }
      html += '</table>';
    }
    document.getElementById('runs').innerHTML = html;
    err.textContent = '';
  } catch (e) { err.textContent = String(e.message || e); }
  document.getElementById('when').textContent = 'updated ' + new Date().toLocaleTimeString();
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    """The status page (static: it fetches the API itself)."""
    return HTMLResponse(PAGE)
