/* runctl console: One run's page (/console/RUN) or one rank's (/console/RUN/RANK). */
import { api, can } from './api.js';
import { Charts } from './charts.js';
import { editForm } from './edit.js';
import { Live, follow } from './live.js';
import { RANK_HEAD, crumbs, rankFrom, rankRow, statusOf, touch } from './ranks.js';
import { eventsSection, historySection, stepsSection } from './sections.js';
import { stopForm } from './stop.js';
import { $, debounce, enc, h, notice, rankOrder } from './util.js';

export async function runPage(run, onlyRank) {
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

  follow(new Live(`${base}/live`, {
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
      if (msg.state === null) {
        // too large for a bus message: the rank carries its size instead (docs/reliability.md)
        if (stateView && msg.rank === onlyRank) {
          stateView.textContent = 'the state is too large for a bus message (max_payload): read one field';
        }
      } else if (msg.state !== undefined) {
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
  }).start());
}
