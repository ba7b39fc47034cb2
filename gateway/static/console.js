/* runctl console. Served by the gateway itself: no build step, no CDN.
 *
 * Everything it shows comes from the gateway's HTTP API, called with the bearer token typed
 * into the page (kept in sessionStorage, i.e. this tab only; never a cookie). Live updates
 * are server-sent events read with fetch (so the token goes in the Authorization header):
 * GET /live (every run) and GET /runs/{run}/live (one run). Curves: uPlot (static/vendor).
 *
 * Pages (stable URLs): /  every run;  /console/RUN  one run;  /console/RUN/RANK  one rank.
 */
'use strict';
(function () {
  // ---------------------------------------------------------------- small helpers
  const $ = (sel, root) => (root || document).querySelector(sel);
  const enc = encodeURIComponent;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /** h('div', {class: 'x', onclick: f, text: 'hi'}, child, 'text', ...): DOM without HTML strings. */
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k === 'value') el.value = v;
      else if (k === 'checked') el.checked = Boolean(v);
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }

  function rankOrder(a, b) {
    const na = /^\d+$/.test(a), nb = /^\d+$/.test(b);
    if (na && nb) return Number(a) - Number(b);
    if (na !== nb) return na ? -1 : 1;
    return a < b ? -1 : a > b ? 1 : 0;
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return '';
    if (seconds < 1) return 'now';
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
    return `${Math.round(seconds / 86400)} d ago`;
  }

  function fmtNum(v) {
    if (v === null || v === undefined) return '';
    if (typeof v !== 'number') return String(v);
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e6) ? v.toExponential(3) : String(Number(v.toPrecision(5)));
  }

  function fmtDuration(s) {
    if (s === null || s === undefined) return '';
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 120) return `${s.toFixed(1)} s`;
    if (s < 7200) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  const fmtTime = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : '');
  const short = (v, n) => {
    const s = typeof v === 'string' ? v : JSON.stringify(v);
    return s === undefined ? '' : s.length > n ? s.slice(0, n - 1) + '…' : s;
  };

  function debounce(fn, ms) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  function notice(text, kind) {
    const el = $('#notice');
    el.textContent = text || '';
    el.className = kind || '';
  }

  // ---------------------------------------------------------------- the API
  const TOKEN_KEY = 'runctl-token';
  const ROLES = ['read', 'write', 'admin'];
  const session = { token: sessionStorage.getItem(TOKEN_KEY) || '', role: null, tokens: false };
  const can = (role) => session.role !== null && ROLES.indexOf(session.role) >= ROLES.indexOf(role);

  function authHeaders(extra) {
    const headers = Object.assign({}, extra);
    if (session.token) headers.Authorization = 'Bearer ' + session.token;
    return headers;
  }

  /** One API call. Never throws: {status, ok, body, message}; status 0: not reachable. */
  async function api(method, path, body) {
    const init = {
      method,
      headers: authHeaders({ Accept: 'application/json' }),
      credentials: 'omit', // bearer tokens only: the page never relies on cookies
      cache: 'no-store',
    };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      return { status: 0, ok: false, body: null, message: 'the gateway cannot be reached' };
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (err) {
      data = text;
    }
    let message = '';
    if (!response.ok) {
      if (data && typeof data.message === 'string') message = data.message;
      else if (data && typeof data.detail === 'string') message = data.detail;
      else message = `${response.status} ${response.statusText}`;
    }
    return { status: response.status, ok: response.ok, body: data, message };
  }

  async function loadRole() {
    const r = await api('GET', '/whoami');
    const badge = $('#role');
    if (r.ok) {
      session.role = r.body.role;
      session.tokens = Boolean(r.body.tokens);
      badge.textContent = session.tokens ? `role: ${session.role}` : 'open (loopback, no tokens)';
      return true;
    }
    session.role = null;
    badge.textContent = r.status === 401 ? 'token needed' : 'offline';
    if (r.status === 401) {
      notice(
        session.token
          ? 'This token is not accepted by the gateway.'
          : 'This gateway needs a bearer token: type it in the token box above (it is kept in this tab only).'
      );
    } else {
      notice(r.message || 'the gateway cannot be reached');
    }
    return false;
  }

  // ---------------------------------------------------------------- live updates (SSE over fetch)
  const liveRule = { beats: 3, floor: 1.5 };

  class Live {
    constructor(path, handlers) {
      this.path = path;
      this.handlers = handlers;
      this.controller = null;
      this.stopped = false;
      this.delay = 1000;
    }

    start() {
      this.stopped = false;
      this.loop();
      return this;
    }

    stop() {
      this.stopped = true;
      if (this.controller) this.controller.abort();
    }

    async loop() {
      while (!this.stopped) {
        this.controller = new AbortController();
        try {
          const response = await fetch(this.path, {
            headers: authHeaders({ Accept: 'text/event-stream' }),
            signal: this.controller.signal,
            credentials: 'omit',
            cache: 'no-store',
          });
          if (!response.ok || !response.body) throw new Error(String(response.status));
          this.delay = 1000;
          await this.read(response.body);
        } catch (err) {
          if (this.stopped) return;
        }
        if (this.stopped) return;
        indicator(false, 'reconnecting');
        await sleep(this.delay);
        this.delay = Math.min(this.delay * 2, 10000);
      }
    }

    async read(body) {
      const reader = body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let event = 'message';
          let data = '';
          for (const line of block.split('\n')) {
            if (line.startsWith('event:')) event = line.slice(6).trim();
            else if (line.startsWith('data:')) data += line.slice(5).trim();
          }
          if (!data) continue;
          let parsed;
          try {
            parsed = JSON.parse(data);
          } catch (err) {
            continue;
          }
          if (event === 'hello') {
            liveRule.beats = parsed.stale_after_beats;
            liveRule.floor = parsed.stale_floor_s;
            indicator(true, 'live');
          }
          const handler = this.handlers[event];
          if (handler) handler(parsed);
        }
      }
    }
  }

  function indicator(on, text) {
    const el = $('#live');
    el.className = 'live ' + (on ? 'on' : 'off');
    el.lastChild.textContent = text;
  }

  let currentLive = null;
  window.addEventListener('pagehide', () => currentLive && currentLive.stop());

  // ---------------------------------------------------------------- ranks: liveness and the table
  /** A rank as the page knows it: from GET /runs[/{run}], then kept current by live messages. */
  function rankFrom(summary) {
    return {
      run: summary.run,
      rank: String(summary.rank),
      version: summary.version,
      step: summary.step,
      step_rate: summary.step_rate,
      host: summary.host,
      pid: summary.pid,
      interval: summary.heartbeat_interval || 1,
      exited: summary.status === 'exited',
      serverStatus: summary.status,
      stopRequested: Boolean(summary.stop_requested),
      age0: summary.heartbeat_age_s || 0,
      idle0: summary.idle_s ?? null,
      error: summary.error || null,
      at: performance.now(),
    };
  }

  function touch(info, msg) {
    info.version = msg.version;
    if (msg.step !== undefined) info.step = msg.step;
    if (msg.step_rate !== undefined) info.step_rate = msg.step_rate;
    if (msg.heartbeat_interval) info.interval = msg.heartbeat_interval;
    info.age0 = msg.age || 0;
    info.idle0 = msg.idle ?? null;
    info.at = performance.now();
    info.serverStatus = msg.status || 'alive';
  }

  const since = (info) => (performance.now() - info.at) / 1000;
  const ageOf = (info) => info.age0 + since(info);
  const idleOf = (info) => (info.idle0 === null || info.idle0 === undefined ? null : info.idle0 + since(info));

  /** exited (it said so), stale (no heartbeat for a while: derived here as time passes),
   * else what the gateway said with the last message: alive or stalled. */
  function statusOf(info) {
    if (info.exited) return 'exited';
    if (ageOf(info) > Math.max(liveRule.beats * info.interval, liveRule.floor)) return 'stale';
    return info.serverStatus === 'stalled' ? 'stalled' : 'alive';
  }

  function statusCell(info) {
    const status = statusOf(info);
    const label = info.stopRequested && status !== 'exited' ? `${status}, stopping` : status;
    return h('span', { class: `status ${info.stopRequested && status === 'alive' ? 'stopping' : status}`, text: label });
  }

  function rankRow(info, withLink) {
    const link = `/console/${enc(info.run)}/${enc(info.rank)}`;
    return h(
      'tr',
      { 'data-rank': info.rank, 'data-status': statusOf(info) },
      h('td', {}, withLink ? h('a', { href: link, text: `rank ${info.rank}` }) : `rank ${info.rank}`),
      h('td', {}, statusCell(info)),
      h('td', { class: 'num', text: info.version }),
      h('td', { class: 'num', text: info.step ?? '' }),
      h('td', { class: 'num', text: info.step_rate ? fmtNum(info.step_rate) : '' }),
      h('td', { class: 'num', text: info.exited || idleOf(info) === null ? '' : ago(idleOf(info)) }),
      h('td', { class: 'num', text: info.exited ? '' : ago(ageOf(info)) }),
      h('td', { class: 'mono', text: `${info.host}/${info.pid}` }, info.error ? h('div', { class: 'bad', text: short(info.error, 120) }) : null)
    );
  }

  const RANK_HEAD = () =>
    h(
      'tr',
      {},
      ['rank', 'status', 'version', 'step', 'steps/s', 'advanced', 'heartbeat', 'host/pid'].map((t, i) =>
        h('th', { class: i >= 2 && i <= 6 ? 'num' : '', text: t, title: t === 'advanced' ? 'when the program last made progress (a step)' : undefined })
      )
    );

  function crumbs(run, rank) {
    const nav = $('#crumbs');
    nav.replaceChildren();
    nav.append(h('a', { href: '/', text: 'runs' }));
    if (run) {
      nav.append(h('span', { class: 'sep', text: '/' }), h('a', { href: `/console/${enc(run)}`, text: run }));
    }
    if (rank) {
      nav.append(
        h('span', { class: 'sep', text: '/' }),
        h('a', { href: `/console/${enc(run)}/${enc(rank)}`, text: `rank ${rank}` })
      );
    }
    document.title = rank ? `${run}/${rank} · runctl` : run ? `${run} · runctl` : 'runctl console';
  }

  // ---------------------------------------------------------------- the overview: every run
  async function overviewPage() {
    crumbs();
    const main = $('#main');
    const runs = new Map(); // run -> Map(rank -> info)
    const search = h('input', { type: 'search', placeholder: 'filter: run, host or rank', id: 'filter' });
    const statusFilter = h(
      'select',
      { id: 'status-filter' },
      ['any status', 'alive', 'stalled', 'stale', 'exited'].map((s) => h('option', { value: s === 'any status' ? '' : s, text: s }))
    );
    const hideExited = h('input', { type: 'checkbox', id: 'hide-exited' });
    const list = h('div', { id: 'runs' });
    main.replaceChildren(
      h('h1', {}, 'Runs', h('small', { id: 'runs-count' })),
      h('div', { class: 'filters' }, search, statusFilter, h('label', {}, hideExited, ' hide runs whose ranks all exited')),
      list
    );

    async function load() {
      const r = await api('GET', '/runs');
      if (!r.ok) {
        notice(r.message);
        return;
      }
      notice('');
      runs.clear();
      for (const run of r.body.runs) {
        const ranks = new Map();
        for (const summary of run.ranks) ranks.set(String(summary.rank), rankFrom(summary));
        runs.set(run.run, ranks);
      }
      render();
    }
    const reload = debounce(load, 300);

    function render() {
      const text = search.value.trim().toLowerCase();
      const wanted = statusFilter.value;
      const cards = [];
      let shown = 0;
      for (const [run, ranks] of [...runs.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
        const infos = [...ranks.values()].sort((a, b) => rankOrder(a.rank, b.rank));
        const counts = { alive: 0, stalled: 0, stale: 0, exited: 0 };
        for (const info of infos) counts[statusOf(info)] = (counts[statusOf(info)] || 0) + 1;
        if (hideExited.checked && counts.exited === infos.length) continue;
        const rows = infos.filter((info) => {
          if (wanted && statusOf(info) !== wanted) return false;
          if (!text) return true;
          return [run, info.rank, info.host].some((s) => String(s).toLowerCase().includes(text));
        });
        if (!rows.length) continue;
        shown += 1;
        const steps = infos.map((i) => i.step).filter((s) => s !== null && s !== undefined);
        const rate = infos.reduce((sum, i) => sum + (statusOf(i) === 'alive' ? i.step_rate || 0 : 0), 0);
        cards.push(
          h(
            'section',
            { class: 'card run', 'data-run': run },
            h(
              'h2',
              {},
              h('a', { href: `/console/${enc(run)}`, text: run }),
              h(
                'small',
                {},
                `${infos.length} rank(s): ${counts.alive} alive, ${counts.stalled ? counts.stalled + ' stalled, ' : ''}${counts.stale} stale, ${counts.exited} exited`,
                steps.length ? ` · step ${Math.min(...steps)}–${Math.max(...steps)}` : '',
                rate ? ` · ${fmtNum(rate)} steps/s` : ''
              )
            ),
            h('table', {}, h('thead', {}, RANK_HEAD()), h('tbody', {}, rows.map((info) => rankRow(info, true))))
          )
        );
      }
      $('#runs-count').textContent = `${shown} of ${runs.size}`;
      list.replaceChildren(...(cards.length ? cards : [h('p', { class: 'muted', text: runs.size ? 'No run matches the filter.' : 'No runs yet: start a program with control().' })]));
    }

    for (const el of [search, statusFilter, hideExited]) el.addEventListener('input', render);
    await load();
    setInterval(render, 1000); // ages and liveness move with the clock (no request)
    currentLive = new Live('/live', {
      hello: () => reload(),
      state: (msg) => {
        const info = runs.get(msg.run) && runs.get(msg.run).get(msg.rank);
        if (!info) return reload();
        touch(info, msg);
        if (info.exited) reload(); // came back under the same id
      },
      event: (ev) => {
        const info = runs.get(ev.run) && runs.get(ev.run).get(ev.rank);
        if (ev.kind === 'started' || !info) return reload();
        if (ev.kind === 'exited') info.exited = true;
        if (ev.kind === 'stop_requested') info.stopRequested = true;
      },
    }).start();
  }

  // ---------------------------------------------------------------- charts (uPlot)
  const PALETTE = ['#2f6fde', '#e0542c', '#1a9c5b', '#9b4dca', '#d19a00', '#0aa2b5', '#c2185b', '#5d6d7e', '#7cb342', '#8d6e63'];
  const rankColor = (rank, i) => (i < PALETTE.length ? PALETTE[i] : `hsl(${(i * 47) % 360} 60% 45%)`);
  const STEP_RATE = '@step_rate';
  const MAX_POINTS = 3600;

  class Charts {
    constructor(container, onlyRank) {
      this.el = container;
      this.onlyRank = onlyRank;
      this.series = new Map(); // key -> Map(rank -> Map(second -> value))
      this.plots = new Map(); // key -> {plot, ranks, box}
      this.dirty = new Set();
      this.order = [STEP_RATE];
      this.busy = 0;
      this.timer = setInterval(() => this.flush(), 1000);
      this.resize = debounce(() => {
        for (const p of this.plots.values()) p.plot.setSize({ width: this.width(p.box), height: 170 });
      }, 200);
      window.addEventListener('resize', this.resize);
    }

    add(key, rank, t, value) {
      if (this.onlyRank !== undefined && rank !== this.onlyRank) return;
      let perRank = this.series.get(key);
      if (!perRank) {
        perRank = new Map();
        this.series.set(key, perRank);
        if (!this.order.includes(key)) this.order.push(key);
      }
      let points = perRank.get(rank);
      if (!points) perRank.set(rank, (points = new Map()));
      // one point per rank and second: heartbeats of every rank then share x values
      const second = Math.round(t);
      points.delete(second);
      points.set(second, value === undefined ? null : value);
      if (points.size > MAX_POINTS) points.delete(points.keys().next().value);
      this.dirty.add(key);
    }

    /** A state message (live) or one point of GET /runs/{run}/series. */
    point(rank, t, stepRate, numbers) {
      this.add(STEP_RATE, rank, t, stepRate);
      for (const [name, value] of Object.entries(numbers || {})) this.add(name, rank, t, value);
    }

    load(series) {
      for (const [rank, s] of Object.entries(series.ranks || {})) {
        for (let i = 0; i < s.t.length; i++) {
          const numbers = {};
          for (const [name, column] of Object.entries(s.fields)) numbers[name] = column[i];
          this.point(rank, s.t[i], s.step_rate[i], numbers);
        }
      }
      this.flush();
    }

    width(box) {
      return Math.max(280, box.clientWidth - 14);
    }

    flush() {
      if (this.busy > 0) {
        this.busy -= 1; // a slow machine: draw less often
        return;
      }
      const started = performance.now();
      const keys = this.order.filter((k) => this.dirty.has(k));
      this.dirty.clear();
      for (const key of keys) this.draw(key);
      this.busy = Math.min(10, Math.floor((performance.now() - started) / 200));
    }

    draw(key) {
      const perRank = this.series.get(key);
      if (!perRank) return;
      const ranks = [...perRank.keys()].sort(rankOrder);
      const xs = new Set();
      for (const points of perRank.values()) for (const second of points.keys()) xs.add(second);
      const x = [...xs].sort((a, b) => a - b);
      const index = new Map(x.map((second, i) => [second, i]));
      let count = 0;
      const columns = ranks.map((rank) => {
        const column = new Array(x.length).fill(null);
        for (const [second, value] of perRank.get(rank)) {
          column[index.get(second)] = value;
          if (value !== null) count += 1;
        }
        return column;
      });
      const data = [x, ...columns];
      let entry = this.plots.get(key);
      if (entry && entry.ranks.join() !== ranks.join()) {
        entry.plot.destroy();
        entry.box.remove();
        this.plots.delete(key);
        entry = undefined;
      }
      if (!entry) {
        const label = key === STEP_RATE ? 'step rate (steps/s)' : key;
        const box = h('div', { class: 'chart', 'data-field': key === STEP_RATE ? 'step_rate' : key });
        this.place(key, box);
        const plot = new uPlot(
          {
            width: this.width(box),
            height: 170,
            title: label,
            scales: { x: { time: true } },
            cursor: { drag: { x: true, y: false } },
            series: [
              {},
              ...ranks.map((rank, i) => ({
                label: `rank ${rank}`,
                stroke: rankColor(rank, i),
                width: 1.5,
                spanGaps: true,
                points: { show: false },
                value: (u, v) => fmtNum(v),
              })),
            ],
            axes: [
              { stroke: '#6b7280', grid: { stroke: '#eef0f3' }, ticks: { stroke: '#e3e6eb' } },
              { stroke: '#6b7280', size: 60, grid: { stroke: '#eef0f3' }, ticks: { stroke: '#e3e6eb' } },
            ],
          },
          data,
          box
        );
        entry = { plot, ranks, box };
        this.plots.set(key, entry);
      } else {
        entry.plot.setData(data);
      }
      entry.box.dataset.points = String(count);
    }

    place(key, box) {
      // keep the order: step rate first, then the fields in the order they first appeared
      const position = this.order.indexOf(key);
      for (const other of this.order.slice(position + 1)) {
        const next = this.plots.get(other);
        if (next) {
          this.el.insertBefore(box, next.box);
          return;
        }
      }
      this.el.append(box);
    }
  }

  // ---------------------------------------------------------------- forms from the JSON schema
  function deref(schema, root) {
    let s = schema || {};
    for (let depth = 0; depth < 32; depth++) {
      if (s.$ref) {
        const name = decodeURIComponent(s.$ref.replace(/^#\/(\$defs|definitions)\//, '')).replace(/~1/g, '/').replace(/~0/g, '~');
        const target = (root.$defs || root.definitions || {})[name] || {};
        const { $ref, ...rest } = s;
        s = Object.assign({}, target, rest);
      } else if (Array.isArray(s.allOf) && s.allOf.length === 1) {
        const { allOf, ...rest } = s;
        s = Object.assign({}, allOf[0], rest);
      } else {
        return s;
      }
    }
    return s;
  }

  /** What control a field gets: enum, bool, number, string, group or json (+ nullable). */
  function describe(schema, root) {
    let s = deref(schema, root);
    let nullable = false;
    const variants = s.anyOf || s.oneOf;
    if (Array.isArray(variants)) {
      const real = variants.map((v) => deref(v, root)).filter((v) => {
        if (v.type === 'null') {
          nullable = true;
          return false;
        }
        return true;
      });
      if (real.length !== 1) return { kind: 'json', nullable, schema: s };
      const { anyOf, oneOf, ...outer } = s;
      s = Object.assign({}, real[0], outer);
    }
    let type = s.type;
    if (Array.isArray(type)) {
      nullable = nullable || type.includes('null');
      const rest = type.filter((t) => t !== 'null');
      type = rest.length === 1 ? rest[0] : undefined;
    }
    const base = { nullable, schema: s, title: s.title, description: s.description };
    if (Array.isArray(s.enum)) return Object.assign(base, { kind: 'enum', options: s.enum });
    if ('const' in s) return Object.assign(base, { kind: 'enum', options: [s.const] });
    if (type === 'boolean') return Object.assign(base, { kind: 'bool' });
    if (type === 'integer' || type === 'number') return Object.assign(base, { kind: 'number', integer: type === 'integer' });
    if (type === 'string') return Object.assign(base, { kind: 'string' });
    if (type === 'object' && s.properties) return Object.assign(base, { kind: 'group' });
    return Object.assign(base, { kind: 'json' });
  }

  function constraintHint(d) {
    const s = d.schema;
    const parts = [];
    if (d.kind === 'number') {
      if (d.integer) parts.push('integer');
      if (s.exclusiveMinimum !== undefined) parts.push(`> ${s.exclusiveMinimum}`);
      if (s.minimum !== undefined) parts.push(`≥ ${s.minimum}`);
      if (s.exclusiveMaximum !== undefined) parts.push(`< ${s.exclusiveMaximum}`);
      if (s.maximum !== undefined) parts.push(`≤ ${s.maximum}`);
      if (s.multipleOf !== undefined) parts.push(`multiple of ${s.multipleOf}`);
    } else if (d.kind === 'string') {
      if (s.minLength !== undefined) parts.push(`≥ ${s.minLength} chars`);
      if (s.maxLength !== undefined) parts.push(`≤ ${s.maxLength} chars`);
      if (s.pattern) parts.push(`matches ${s.pattern}`);
      if (s.format) parts.push(s.format);
    } else if (d.kind === 'json') {
      parts.push('JSON');
    }
    return parts.join(', ');
  }

  const NUMBER = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/;
  const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

  /** One editable field: its control, how to read and set it, where its error goes. */
  function makeField(path, d, value) {
    const id = 'f-' + path.join('.').replace(/[^A-Za-z0-9_.-]/g, '_');
    const field = { path, key: path.join('.'), d, initial: value, touched: false };
    let control;
    if (d.kind === 'enum') {
      control = h(
        'select',
        { id, name: field.key },
        d.options.map((o) => h('option', { value: JSON.stringify(o), text: String(o) }))
      );
      field.read = () => ({ ok: true, value: JSON.parse(control.value) });
      field.write = (v) => {
        if (v !== null && v !== undefined) control.value = JSON.stringify(v);
      };
    } else if (d.kind === 'bool') {
      control = h('input', { id, name: field.key, type: 'checkbox', role: 'switch' });
      field.read = () => ({ ok: true, value: control.checked });
      field.write = (v) => {
        control.checked = Boolean(v);
      };
    } else if (d.kind === 'number') {
      control = h('input', { id, name: field.key, type: 'text', inputmode: 'decimal', autocomplete: 'off', spellcheck: 'false' });
      // what is typed is sent as typed (a number, else the text): pydantic says what is wrong
      field.read = () => {
        const text = control.value.trim();
        return { ok: true, value: NUMBER.test(text) ? Number(text) : text };
      };
      field.write = (v) => {
        control.value = v === null || v === undefined ? '' : String(v);
      };
    } else if (d.kind === 'string') {
      control = h('input', { id, name: field.key, type: 'text', autocomplete: 'off', spellcheck: 'false' });
      field.read = () => ({ ok: true, value: control.value });
      field.write = (v) => {
        control.value = v === null || v === undefined ? '' : String(v);
      };
    } else {
      control = h('textarea', { id, name: field.key, rows: 2, spellcheck: 'false' });
      field.read = () => {
        try {
          return { ok: true, value: JSON.parse(control.value) };
        } catch (err) {
          return { ok: false, error: `not valid JSON: ${err.message}` };
        }
      };
      field.write = (v) => {
        control.value = v === undefined ? '' : JSON.stringify(v);
      };
    }
    const kids = [control];
    let none = null;
    if (d.nullable) {
      none = h('input', { type: 'checkbox', class: 'none-toggle', name: field.key + '.none' });
      kids.push(h('label', { class: 'none', title: 'set to None (null)' }, none, 'none'));
      none.addEventListener('change', () => {
        control.disabled = none.checked;
        changed();
      });
    }
    const hint = constraintHint(d);
    if (hint) kids.push(h('span', { class: 'hint', text: hint }));
    const err = h('div', { class: 'err', 'data-error-for': field.key });
    const row = h(
      'div',
      { class: 'field', 'data-path': field.key },
      h('label', { class: 'name', for: id, title: d.description || '', text: path[path.length - 1] }),
      h('div', { class: 'control' }, kids),
      err
    );
    field.row = row;
    field.err = err;
    field.get = () => (none && none.checked ? { ok: true, value: null } : field.read());
    field.set = (v) => {
      if (none) {
        none.checked = v === null;
        control.disabled = v === null;
      }
      field.write(v);
    };
    field.dirty = () => {
      const got = field.get();
      return !got.ok || !same(got.value, field.initial);
    };
    function changed() {
      field.touched = true;
      row.classList.toggle('changed', field.dirty());
      row.classList.remove('invalid');
      err.textContent = '';
    }
    control.addEventListener('input', changed);
    control.addEventListener('change', changed);
    field.set(value);
    return field;
  }

  function buildFields(schema, root, state, path, fields, depth) {
    const nodes = [];
    const props = schema.properties || {};
    for (const [name, prop] of Object.entries(props)) {
      const p = path.concat(name);
      const d = describe(prop, root);
      const value = state && typeof state === 'object' ? state[name] : undefined;
      if (d.kind === 'group' && depth < 8 && value !== null && value !== undefined) {
        nodes.push(
          h(
            'fieldset',
            { 'data-path': p.join('.') },
            h('legend', { text: name, title: d.description || '' }),
            buildFields(d.schema, root, value, p, fields, depth + 1)
          )
        );
      } else {
        const field = makeField(p, d.kind === 'group' ? Object.assign({}, d, { kind: 'json' }) : d, value);
        fields.push(field);
        nodes.push(field.row);
      }
    }
    return nodes;
  }

  function valueAt(state, path) {
    let v = state;
    for (const k of path) {
      if (v === null || typeof v !== 'object') return undefined;
      v = v[k];
    }
    return v;
  }

  function assignPath(target, path, value) {
    let node = target;
    for (const k of path.slice(0, -1)) {
      if (!node[k] || typeof node[k] !== 'object') node[k] = {};
      node = node[k];
    }
    node[path[path.length - 1]] = value;
  }

  /** pydantic's errors, each at the field its `loc` names (or the nearest group). */
  function showErrors(fields, errors, general) {
    const unplaced = [];
    for (const e of errors) {
      const loc = (e.loc || []).filter((x) => x !== 'body' && x !== 'query').map(String);
      let field = null;
      for (let n = loc.length; n > 0 && !field; n--) {
        const key = loc.slice(0, n).join('.');
        field = fields.find((f) => f.key === key) || null;
      }
      const text = e.rank !== undefined ? `${e.msg} (rank ${e.rank})` : e.msg;
      if (field) {
        field.row.classList.add('invalid');
        field.err.textContent = field.err.textContent ? `${field.err.textContent}; ${text}` : text;
      } else {
        unplaced.push(`${loc.join('.') || 'state'}: ${text}`);
      }
    }
    if (unplaced.length) general(unplaced.join('; '));
  }

  // ---------------------------------------------------------------- one run (or one rank)
  async function runPage(run, onlyRank) {
    crumbs(run, onlyRank);
    const main = $('#main');
    const base = `/runs/${enc(run)}`;
    const ranks = new Map();
    const ranksBody = h('tbody');
    const docsLink = h('a', { href: `${base}/docs`, text: 'typed API docs' });
    main.replaceChildren(
      h(
        'h1',
        {},
        onlyRank === undefined ? run : `${run} / rank ${onlyRank}`,
        h('small', { id: 'run-summary' }),
        h('small', {}, docsLink, ' · ', h('a', { href: base, text: 'JSON' }))
      ),
      h('section', { class: 'card', id: 'ranks' }, h('table', {}, h('thead', {}, RANK_HEAD()), ranksBody), h('div', { class: 'muted', id: 'spread' }))
    );
    const spread = $('#spread');

    const r = await api('GET', base);
    if (!r.ok) {
      notice(r.status === 404 ? `No run named ${run} is known to the registry.` : r.message);
      return;
    }
    notice('');
    for (const summary of r.body.ranks) ranks.set(String(summary.rank), rankFrom(summary));
    if (onlyRank !== undefined && !ranks.has(onlyRank)) {
      notice(`Run ${run} has no rank ${onlyRank}.`);
      return;
    }
    const shown = () => [...ranks.values()].filter((i) => onlyRank === undefined || i.rank === onlyRank).sort((a, b) => rankOrder(a.rank, b.rank));

    function renderRanks() {
      ranksBody.replaceChildren(...shown().map((info) => rankRow(info, onlyRank === undefined)));
      const all = [...ranks.values()];
      const count = (s) => all.filter((i) => statusOf(i) === s).length;
      const stalled = count('stalled');
      $('#run-summary').textContent = `${all.length} rank(s), ${count('alive')} alive` + (stalled ? `, ${stalled} stalled` : '');
      // how far the running ranks are apart, from the steps they report
      const steps = all.filter((i) => ['alive', 'stalled'].includes(statusOf(i)) && i.step !== null && i.step !== undefined);
      const lead = steps.length ? Math.max(...steps.map((i) => i.step)) : null;
      // ranks report their step once per heartbeat: a lag within two heartbeats is not one
      const rate = Math.max(0, ...steps.map((i) => i.step_rate || 0));
      const noise = Math.max(2, Math.ceil(2 * rate * Math.max(...steps.map((i) => i.interval), 1)));
      const behind = steps.filter((i) => lead - i.step > noise).sort((a, b) => a.step - b.step);
      spread.textContent = behind.length > 0
        ? `behind the leader (step ${lead}): ` + behind.slice(0, 8).map((i) => `rank ${i.rank} by ${lead - i.step}`).join(', ') + (behind.length > 8 ? ', …' : '')
        : '';
    }
    renderRanks();
    setInterval(renderRanks, 1000);

    // --- curves
    const chartsBox = h('div', { class: 'charts', id: 'charts' });
    const chartsNote = h('small', { class: 'muted' });
    main.append(h('section', { class: 'card' }, h('h2', {}, 'Curves', chartsNote), chartsBox));
    const charts = new Charts(chartsBox, onlyRank);

    // --- forms (write: edit; admin: stop) and the state
    const states = new Map(); // rank -> last state seen
    const firstRank = onlyRank !== undefined ? onlyRank : shown()[0].rank;
    const stateAll = await api('GET', `${base}/ranks/all/get`);
    if (stateAll.ok) {
      for (const [rank, entry] of Object.entries(stateAll.body.ranks || {})) {
        if (entry.value !== undefined) states.set(rank, entry.value);
      }
    }
    let editor = null;
    let stopper = null;
    const panels = [];
    if (can('write')) {
      const schema = await api('GET', `${base}/ranks/${enc(firstRank)}/schema`);
      if (schema.ok) {
        editor = editForm(run, schema.body, states, onlyRank, () => [...ranks.keys()].sort(rankOrder));
        panels.push(editor.el);
      } else {
        panels.push(h('section', { class: 'card' }, h('h2', {}, 'Change'), h('p', { class: 'muted', text: `no schema: ${schema.message}` })));
      }
    }
    if (can('admin')) {
      // a stop goes to the ranks still running: an exited rank has nothing to acknowledge
      stopper = stopForm(run, onlyRank, () => [...ranks.values()].filter((i) => !i.exited).map((i) => i.rank).sort(rankOrder));
      panels.push(stopper.el);
    }
    let stateView = null;
    if (onlyRank !== undefined) {
      stateView = h('pre', { class: 'state', id: 'state' });
      stateView.textContent = JSON.stringify(states.get(onlyRank) ?? null, null, 2);
      panels.push(h('section', { class: 'card' }, h('h2', {}, 'State'), stateView));
    }
    if (panels.length) main.append(h('div', { class: 'grid2' }, panels));

    // --- steps, events, history
    const steps = stepsSection(run, onlyRank);
    main.append(steps.el);
    const history = historySection(run, onlyRank);
    const events = eventsSection(onlyRank);
    main.append(history.el, events.el);

    // history of the curves from what the bus keeps, then live points
    async function loadSeries() {
      const q = onlyRank !== undefined ? `&rank=${enc(onlyRank)}` : '';
      const s = await api('GET', `${base}/series?since=900${q}`);
      if (s.ok) {
        charts.load(s.body);
        chartsNote.textContent = s.body.available
          ? 'the last 15 minutes from the bus, then live'
          : 'live only (the bus keeps no state history yet)';
      }
    }
    await loadSeries();
    steps.load();
    history.load();

    const reloadRanks = debounce(async () => {
      const again = await api('GET', base);
      if (!again.ok) return;
      for (const summary of again.body.ranks) {
        const old = ranks.get(String(summary.rank));
        const info = rankFrom(summary);
        if (old) info.stopRequested = info.stopRequested || old.stopRequested;
        ranks.set(info.rank, info);
      }
      renderRanks();
    }, 300);
    const reloadSteps = debounce(() => steps.load(), 1500);
    const reloadHistory = debounce(() => history.load(), 800);
    let connected = false;
    const fetching = new Set();
    function gotState(rank, state) {
      states.set(rank, state);
      if (editor) editor.update(rank, state);
      if (stateView && rank === onlyRank) stateView.textContent = JSON.stringify(state, null, 2);
    }

    currentLive = new Live(`${base}/live`, {
      hello: () => {
        if (connected) loadSeries(); // a reconnect: fill the gap from the bus
        connected = true;
      },
      state: (msg) => {
        const info = ranks.get(msg.rank);
        if (!info) {
          reloadRanks();
        } else {
          if (info.exited) reloadRanks();
          touch(info, msg);
        }
        charts.point(msg.rank, msg.ts, msg.step_rate, msg.numbers);
        if (msg.state !== undefined) {
          gotState(msg.rank, msg.state);
        } else if (msg.state_omitted && (editor || stateView) && !fetching.has(msg.rank)) {
          // too large to follow live: read it when it changed (one read at a time per rank)
          fetching.add(msg.rank);
          api('GET', `${base}/ranks/${enc(msg.rank)}/get`).then((r) => {
            fetching.delete(msg.rank);
            if (r.ok) gotState(msg.rank, r.body);
          });
        }
      },
      event: (ev) => {
        const info = ranks.get(ev.rank);
        if (ev.kind === 'started' || !info) reloadRanks();
        if (info && ev.kind === 'exited') info.exited = true;
        if (info && ev.kind === 'stop_requested') info.stopRequested = true;
        if (stopper) stopper.event(ev);
        events.add(ev);
        if (ev.kind.startsWith('step_')) reloadSteps();
        if (['set', 'patch', 'reset', 'stop_requested', 'rejected', 'cancelled'].includes(ev.kind)) reloadHistory();
      },
    }).start();
  }

  function targetSelect(onlyRank, rankList, id) {
    const select = h('select', { id });
    if (onlyRank !== undefined) {
      select.append(h('option', { value: onlyRank, text: `rank ${onlyRank}` }));
    } else {
      select.append(h('option', { value: 'all', text: 'all ranks' }));
      for (const rank of rankList()) select.append(h('option', { value: rank, text: `rank ${rank}` }));
    }
    return select;
  }

  function editForm(run, schema, states, onlyRank, rankList) {
    const fields = [];
    const result = h('div', { class: 'result', id: 'edit-result', 'aria-live': 'polite' });
    const target = targetSelect(onlyRank, rankList, 'edit-target');
    const sync = h('input', { type: 'checkbox', id: 'edit-sync' });
    const syncLabel = h('label', { title: 'apply on every rank at the same step (the program calls ctl.sync(step))' }, sync, ' at the same step (sync)');
    const submit = h('button', { type: 'submit', class: 'primary', id: 'edit-apply', text: 'Apply' });
    const reset = h('button', { type: 'button', id: 'edit-revert', text: 'Revert edits' });
    const body = h('div', { id: 'edit-fields' });
    const form = h('form', { class: 'edit', id: 'edit', novalidate: true, autocomplete: 'off' }, body, h('div', { class: 'actions' }, h('span', {}, 'to '), target, syncLabel, submit, reset), result);
    const source = () => (onlyRank !== undefined ? onlyRank : target.value === 'all' ? rankList()[0] : target.value);

    function render() {
      fields.length = 0;
      body.replaceChildren(...buildFields(deref(schema, schema), schema, states.get(source()), [], fields, 0));
    }
    render();

    function syncVisible() {
      syncLabel.hidden = target.value !== 'all';
    }
    syncVisible();
    target.addEventListener('change', () => {
      syncVisible();
      // show the chosen rank's values (edits in progress are kept)
      update(source(), states.get(source()), true);
    });
    reset.addEventListener('click', () => {
      for (const f of fields) {
        f.touched = false;
        f.set(f.initial);
        f.row.classList.remove('changed', 'invalid');
        f.err.textContent = '';
      }
      result.replaceChildren();
    });

    function update(rank, state, force) {
      if (state === undefined || (rank !== source() && !force)) return;
      for (const f of fields) {
        const v = valueAt(state, f.path);
        if (f.touched && f.dirty()) {
          continue; // an edit in progress is the user's
        }
        f.initial = v;
        f.touched = false;
        f.set(v);
        f.row.classList.remove('changed');
      }
    }

    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      result.replaceChildren();
      for (const f of fields) {
        f.row.classList.remove('invalid');
        f.err.textContent = '';
      }
      const patch = {};
      let count = 0;
      let bad = false;
      for (const f of fields) {
        if (!f.touched || !f.dirty()) continue;
        const got = f.get();
        if (!got.ok) {
          f.row.classList.add('invalid');
          f.err.textContent = got.error;
          bad = true;
          continue;
        }
        assignPath(patch, f.path, got.value);
        count += 1;
      }
      if (bad) return;
      if (!count) {
        result.append(h('span', { class: 'muted', text: 'Nothing to apply: no field was changed.' }));
        return;
      }
      const to = target.value;
      const query = to === 'all' && sync.checked ? '?sync=true' : '';
      submit.disabled = true;
      const r = await api('PATCH', `/runs/${enc(run)}/ranks/${enc(to)}/set${query}`, patch);
      submit.disabled = false;
      const general = (text) => result.append(h('div', { class: 'bad', text }));
      const body = r.body || {};
      if (r.ok && to !== 'all') {
        result.append(h('span', { class: 'ok', text: `Applied on rank ${body.rank} (version ${body.version}).` }));
        if (body.value !== undefined) {
          states.set(String(body.rank), body.value);
          for (const f of fields) f.touched = false;
          update(String(body.rank), body.value, true);
        }
        return;
      }
      if (body.ranks && typeof body.ranks === 'object') {
        // every rank's outcome (a write to all)
        const errors = [];
        const lines = [];
        for (const [rank, entry] of Object.entries(body.ranks).sort((a, b) => rankOrder(a[0], b[0]))) {
          const cls = entry.outcome === 'applied' || entry.outcome === 'pending' ? 'ok' : entry.outcome === 'no_answer' ? 'warn' : 'bad';
          lines.push(h('li', { class: cls, 'data-rank': rank }, `rank ${rank}: ${entry.outcome.replace('_', ' ')}`, entry.message && entry.outcome === 'rejected' && !entry.detail ? ` (${entry.message})` : ''));
          for (const d of entry.detail || []) errors.push(Object.assign({}, d, { rank }));
          if (entry.value !== undefined && entry.outcome === 'applied') states.set(rank, entry.value);
        }
        if (body.at_step !== undefined && body.at_step !== null) {
          result.append(h('div', { class: body.cancelled ? 'bad' : 'ok', text: body.cancelled ? `Not every rank took it: cancelled everywhere (was for step ${body.at_step}).` : `Scheduled for step ${body.at_step} on every rank.` }));
        }
        result.append(h('ul', { class: 'acks' }, lines));
        // the same error on every rank is shown once, without the rank
        const distinct = new Map();
        for (const e of errors) {
          const k = JSON.stringify([e.loc, e.msg]);
          distinct.set(k, distinct.has(k) ? Object.assign({}, e, { rank: undefined }) : e);
        }
        const rejected = Object.values(body.ranks).filter((x) => x.outcome === 'rejected').length;
        const collapsed = [...distinct.values()].map((e) => (rejected > 1 ? Object.assign({}, e, { rank: undefined }) : e));
        showErrors(fields, collapsed, general);
        if (r.ok && !errors.length) {
          for (const f of fields) f.touched = false;
          update(source(), states.get(source()), true);
        }
        return;
      }
      if (Array.isArray(body.detail)) {
        showErrors(fields, body.detail, general);
        general(body.message || 'refused: nothing changed');
        return;
      }
      general(r.message || 'the change failed');
    });

    return { el: h('section', { class: 'card', id: 'edit-card' }, h('h2', {}, 'Change', h('small', { text: 'one patch, validated by the program' })), form), update };
  }

  function stopForm(run, onlyRank, rankList) {
    const target = targetSelect(onlyRank, rankList, 'stop-target');
    const reason = h('input', { type: 'text', id: 'stop-reason', placeholder: 'reason (shown to the program)', size: 28 });
    const mode = h('select', { id: 'stop-mode' }, h('option', { value: 'graceful', text: 'graceful' }), h('option', { value: 'terminate', text: 'terminate (SIGTERM after grace)' }));
    const grace = h('input', { type: 'text', id: 'stop-grace', value: '30', size: 4, inputmode: 'decimal' });
    const graceLabel = h('label', {}, 'grace ', grace, ' s');
    const button = h('button', { type: 'button', class: 'danger', id: 'stop-button', text: 'Stop…' });
    const acks = h('ul', { class: 'acks', id: 'stop-acks' });
    const result = h('div', { class: 'result', id: 'stop-result', 'aria-live': 'polite' });
    const marks = new Map(); // rank -> li
    let armed = null;
    graceLabel.hidden = true;
    mode.addEventListener('change', () => {
      graceLabel.hidden = mode.value !== 'terminate';
    });

    function mark(rank, cls, text) {
      let li = marks.get(rank);
      if (!li) {
        li = h('li', { 'data-rank': rank });
        marks.set(rank, li);
        acks.append(li);
      }
      if (li.dataset.state === 'exited' && cls !== 'exited') return; // exited is final
      li.className = `ack-${cls}`;
      li.dataset.state = cls;
      li.textContent = `rank ${rank}: ${text}`;
    }

    function disarm() {
      clearTimeout(armed);
      armed = null;
      button.classList.remove('armed');
      button.textContent = 'Stop…';
    }

    button.addEventListener('click', async () => {
      if (!armed) {
        const who = target.value === 'all' ? `all ${rankList().length} rank(s)` : `rank ${target.value}`;
        button.classList.add('armed');
        button.textContent = `Confirm: stop ${who}`;
        armed = setTimeout(disarm, 6000);
        return;
      }
      disarm();
      const to = target.value;
      const ranks = to === 'all' ? rankList() : [to];
      acks.replaceChildren();
      marks.clear();
      result.replaceChildren();
      for (const rank of ranks) mark(rank, 'sent', 'sent');
      const params = new URLSearchParams({ reason: reason.value, mode: mode.value });
      if (mode.value === 'terminate') params.set('grace', grace.value.trim());
      button.disabled = true;
      const r = await api('POST', `/runs/${enc(run)}/ranks/${enc(to)}/stop?${params}`);
      button.disabled = false;
      const body = r.body || {};
      if (body.ranks && typeof body.ranks === 'object') {
        for (const [rank, entry] of Object.entries(body.ranks)) {
          if (entry.outcome === 'no_answer') mark(rank, 'none', 'no answer');
          else if (entry.outcome === 'rejected') mark(rank, 'none', `refused: ${entry.message}`);
          else mark(rank, 'ok', 'acknowledged');
        }
        const missing = body.missing || [];
        result.append(h('span', { class: missing.length ? 'warn' : 'ok', text: missing.length ? `${body.acknowledged.length} acknowledged; no answer from rank(s) ${missing.join(', ')}` : `every rank acknowledged (${body.acknowledged.length})` }));
      } else if (r.ok) {
        mark(String(body.rank), 'ok', 'acknowledged');
        result.append(h('span', { class: 'ok', text: 'acknowledged' }));
      } else {
        for (const rank of body.missing || []) mark(rank, 'none', 'no answer');
        const detail = Array.isArray(body.detail) ? body.detail.map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join('; ') : '';
        result.append(h('span', { class: 'bad', text: detail || r.message }));
      }
      // the answer is final: a rank it does not name did not answer
      for (const [rank, li] of marks) if (li.dataset.state === 'sent') mark(rank, 'none', 'no answer');
    });

    function event(ev) {
      if (!marks.size) return;
      if (ev.kind === 'stop_requested') mark(ev.rank, 'ok', 'acknowledged');
      if (ev.kind === 'exited') mark(ev.rank, 'exited', 'exited');
    }

    const el = h(
      'section',
      { class: 'card', id: 'stop-card' },
      h('h2', {}, 'Stop', h('small', { text: 'the program sees stop_requested' })),
      h('div', { class: 'actions' }, target, reason, mode, graceLabel, button),
      acks,
      result
    );
    return { el, event };
  }

  function stepsSection(run, onlyRank) {
    const timeline = h('div', { class: 'timeline', id: 'steps-timeline' });
    const table = h('tbody');
    const note = h('small', { class: 'muted' });
    const el = h(
      'section',
      { class: 'card', id: 'steps' },
      h('h2', {}, 'Completed steps', note),
      timeline,
      h('div', { class: 'scroll' }, h('table', {}, h('thead', {}, h('tr', {}, ['step', 'rank', 'status', 'duration', 'started', ''].map((t) => h('th', { text: t })))), table))
    );

    async function forget(row, successors, button) {
      if (!button.classList.contains('armed')) {
        button.classList.add('armed');
        button.textContent = 'confirm';
        setTimeout(() => {
          button.classList.remove('armed');
          button.textContent = successors ? 'forget+' : 'forget';
        }, 5000);
        return;
      }
      const params = new URLSearchParams({ rank: row.scope });
      if (successors) params.set('successors', 'true');
      // the label is name[key text]; a selector names the key as name:key text
      const selector = row.key === null || row.key === undefined ? row.name : `${row.name}:${row.step.slice(row.name.length + 1, -1)}`;
      const r = await api('DELETE', `/runs/${enc(run)}/steps/${enc(selector)}?${params}`);
      notice(r.ok ? `forgot ${row.step}${successors ? ' and every later step' : ''}` : r.message, r.ok ? 'info' : '');
      load();
    }

    async function load() {
      const q = onlyRank !== undefined ? `&rank=${enc(onlyRank)}` : '';
      const r = await api('GET', `/runs/${enc(run)}/steps?limit=300${q}`);
      if (!r.ok) {
        note.textContent = r.status === 503 ? 'the step log is not available' : r.message;
        return;
      }
      const rows = r.body.steps || [];
      note.textContent = rows.length ? `${r.body.count} logged${r.body.truncated ? ', the last 300 shown' : ''}` : 'none logged (ctl.steps, ctl.once, @ctl.cached)';
      const now = Date.now() / 1000;
      const spans = rows.filter((x) => x.started);
      timeline.replaceChildren();
      if (spans.length) {
        const t0 = Math.min(...spans.map((x) => x.started));
        const t1 = Math.max(...spans.map((x) => x.ended || (x.status === 'running' ? now : x.started)), t0 + 1);
        const lanes = new Map();
        for (const x of spans) {
          const lane = x.scope === 'run' ? 'run' : String(x.rank);
          if (!lanes.has(lane)) lanes.set(lane, []);
          lanes.get(lane).push(x);
        }
        for (const lane of [...lanes.keys()].sort(rankOrder)) {
          const track = h('div', { class: 'track' });
          for (const x of lanes.get(lane)) {
            const end = x.ended || (x.status === 'running' ? now : x.started);
            const bar = h('div', { class: `bar ${x.status}`, title: `${x.step}: ${x.status}${x.duration ? ', ' + fmtDuration(x.duration) : ''}` });
            bar.style.left = `${((x.started - t0) / (t1 - t0)) * 100}%`;
            bar.style.width = `${Math.max(0.3, ((end - x.started) / (t1 - t0)) * 100)}%`;
            track.append(bar);
          }
          timeline.append(h('div', { class: 'lane' }, h('div', { class: 'label', text: lane === 'run' ? 'run' : `rank ${lane}` }), track));
        }
        timeline.append(h('div', { class: 'axis' }, h('span', { text: fmtTime(t0) }), h('span', { text: fmtTime(t1) })));
      }
      table.replaceChildren(
        ...rows
          .slice()
          .reverse()
          .slice(0, 100)
          .map((x) => {
            const actions = h('td');
            if (can('admin')) {
              const one = h('button', { class: 'small danger', type: 'button', text: 'forget', title: 'forget this step: it runs again' });
              const all = h('button', { class: 'small danger', type: 'button', text: 'forget+', title: 'forget this step and every step started after it' });
              one.addEventListener('click', () => forget(x, false, one));
              all.addEventListener('click', () => forget(x, true, all));
              actions.append(one, ' ', all);
            }
            return h('tr', { 'data-step': x.step, 'data-rank': x.scope === 'run' ? 'run' : String(x.rank) }, h('td', { class: 'mono', text: x.step }), h('td', { text: x.scope === 'run' ? 'run' : x.rank }), h('td', {}, h('span', { class: 'pill', text: x.status })), h('td', { text: fmtDuration(x.duration) }), h('td', { text: fmtTime(x.started) }), actions);
          })
      );
    }
    return { el, load };
  }

  function eventsSection(onlyRank) {
    const body = h('tbody');
    const list = [];
    const own = h('input', { type: 'checkbox', id: 'events-changed' });
    const el = h(
      'section',
      { class: 'card', id: 'events' },
      h('h2', {}, 'Events', h('small', { text: 'live' }), h('label', { class: 'muted' }, own, ' also the state changes the program makes itself')),
      h('div', { class: 'scroll' }, h('table', {}, body))
    );
    function add(ev) {
      if (onlyRank !== undefined && ev.rank !== onlyRank) return;
      if (ev.kind === 'changed' && !own.checked) return;
      const data = Object.assign({}, ev.data);
      const text = Object.keys(data).length ? short(data, 160) : '';
      list.unshift(h('tr', { 'data-kind': ev.kind }, h('td', { text: fmtTime(ev.ts) }), h('td', { text: `rank ${ev.rank}` }), h('td', {}, h('span', { class: 'pill', text: ev.kind })), h('td', { class: 'mono', text })));
      if (list.length > 300) list.pop();
      body.replaceChildren(...list);
    }
    return { el, add };
  }

  /** The change journal, where the gateway has it (GET /runs/{run}/history). */
  function historySection(run, onlyRank) {
    const body = h('tbody');
    const el = h('section', { class: 'card', id: 'history', hidden: true }, h('h2', {}, 'Changes', h('small', { text: 'who, when, what' })), h('div', { class: 'scroll' }, h('table', {}, body)));

    function describeChange(entry) {
      const diffs = [];
      for (const [rank, outcome] of Object.entries(entry.ranks || {})) {
        for (const d of outcome.diff || []) {
          if (diffs.length < 6) diffs.push(h('div', { class: 'diff' }, `${d.path}: `, h('del', { text: short(d.before, 40) }), ' → ', h('ins', { text: short(d.after, 40) }), onlyRank === undefined && Object.keys(entry.ranks).length > 1 ? ` (rank ${rank})` : ''));
        }
      }
      if (!diffs.length && entry.request !== undefined) diffs.push(h('div', { class: 'diff', text: short(entry.request, 120) }));
      return diffs;
    }

    async function undo(entry, button) {
      const force = button.dataset.force === 'yes';
      const r = await api('POST', `/runs/${enc(run)}/undo/${enc(entry.id)}${force ? '?force=true' : ''}`);
      if (r.status === 409 && !force) {
        // a later change touched the same fields: say so, and let the user insist
        notice(`${r.message} (click "force undo" to undo anyway)`);
        button.dataset.force = 'yes';
        button.textContent = 'force undo';
        return;
      }
      notice(r.ok ? `undid ${entry.verb} ${entry.id.slice(0, 8)}` : r.message, r.ok ? 'info' : '');
      button.disabled = r.ok;
      load();
    }

    async function load() {
      const q = onlyRank !== undefined ? `?rank=${enc(onlyRank)}` : '';
      const r = await api('GET', `/runs/${enc(run)}/history${q}`);
      if (!r.ok || !r.body) {
        el.hidden = true; // no journal on this gateway (or not readable)
        return;
      }
      el.hidden = false;
      const entries = Array.isArray(r.body) ? r.body : r.body.changes || r.body.history || r.body.entries || [];
      body.replaceChildren(
        ...entries.slice(0, 200).map((entry) => {
          const who = typeof entry.by === 'string' ? entry.by : entry.by ? entry.by.name || entry.by.user || short(entry.by, 40) : '';
          const actions = h('td');
          if (can('write') && entry.id && !entry.undo_of && !(entry.undone_by || []).length && ['set', 'patch', 'reset'].includes(entry.verb)) {
            const b = h('button', { class: 'small', type: 'button', text: 'undo' });
            b.addEventListener('click', () => undo(entry, b));
            actions.append(b);
          }
          return h('tr', { 'data-change': entry.id || '' }, h('td', { text: fmtTime(entry.ts) }), h('td', { text: who }), h('td', {}, h('span', { class: 'pill', text: entry.verb }), ' ', entry.status || ''), h('td', {}, describeChange(entry)), actions);
        })
      );
    }
    return { el, load };
  }

  // ---------------------------------------------------------------- start
  async function main() {
    const input = $('#token');
    input.value = session.token;
    input.addEventListener('change', () => {
      session.token = input.value.trim();
      if (session.token) sessionStorage.setItem(TOKEN_KEY, session.token);
      else sessionStorage.removeItem(TOKEN_KEY);
      location.reload(); // every section is rebuilt for the new role
    });
    if (!(await loadRole())) return;
    const parts = location.pathname.split('/').filter(Boolean).map(decodeURIComponent);
    if (parts[0] === 'console' && parts.length >= 2) {
      await runPage(parts[1], parts[2]);
    } else {
      await overviewPage();
    }
  }

  main();
})();
