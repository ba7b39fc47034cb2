/* runctl console: Ranks as the page knows them: liveness, the table rows, the breadcrumbs. */
import { liveRule } from './live.js';
import { $, ago, enc, fmtNum, h, short } from './util.js';

/** A rank as the page knows it: from GET /runs[/{run}], then kept current by live messages. */
export function rankFrom(summary) {
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

export function touch(info, msg) {
  info.version = msg.version;
  if (msg.step !== undefined) info.step = msg.step;
  if (msg.step_rate !== undefined) info.step_rate = msg.step_rate;
  if (msg.heartbeat_interval) info.interval = msg.heartbeat_interval;
  info.age0 = msg.age || 0;
  info.idle0 = msg.idle ?? null;
  info.at = performance.now();
  info.serverStatus = msg.status || 'alive';
}

export const since = (info) => (performance.now() - info.at) / 1000;
export const ageOf = (info) => info.age0 + since(info);
export const idleOf = (info) => (info.idle0 === null || info.idle0 === undefined ? null : info.idle0 + since(info));

/** exited (it said so), stale (no heartbeat for a while: derived here as time passes),
 * else what the gateway said with the last message: alive or stalled. */
export function statusOf(info) {
  if (info.exited) return 'exited';
  if (ageOf(info) > Math.max(liveRule.beats * info.interval, liveRule.floor)) return 'stale';
  return info.serverStatus === 'stalled' ? 'stalled' : 'alive';
}

export function statusCell(info) {
  const status = statusOf(info);
  const label = info.stopRequested && status !== 'exited' ? `${status}, stopping` : status;
  return h('span', { class: `status ${info.stopRequested && status === 'alive' ? 'stopping' : status}`, text: label });
}

export function rankRow(info, withLink) {
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

export const RANK_HEAD = () =>
  h(
    'tr',
    {},
    ['rank', 'status', 'version', 'step', 'steps/s', 'advanced', 'heartbeat', 'host/pid'].map((t, i) =>
      h('th', { class: i >= 2 && i <= 6 ? 'num' : '', text: t, title: t === 'advanced' ? 'when the program last made progress (a step)' : undefined })
    )
  );

export function crumbs(run, rank) {
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
