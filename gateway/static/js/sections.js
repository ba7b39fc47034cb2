/* runctl console: The completed-step timeline (forget), the event tail and the change history (undo). */
import { api, can } from './api.js';
import { enc, fmtDuration, fmtTime, h, notice, rankOrder, short } from './util.js';

export function stepsSection(run, onlyRank) {
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

export function eventsSection(onlyRank) {
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
export function historySection(run, onlyRank) {
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
