/* runctl console: The overview page (/): every run and rank, with filters. */
import { api } from './api.js';
import { Live, follow } from './live.js';
import { RANK_HEAD, crumbs, rankFrom, rankRow, statusOf, touch } from './ranks.js';
import { $, debounce, enc, fmtNum, h, notice, rankOrder } from './util.js';

export async function overviewPage() {
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
  follow(new Live('/live', {
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
  }).start());
}
