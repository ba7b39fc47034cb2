/* runctl console: The stop form: every rank's acknowledgement as it arrives, and who did not answer. */
import { api } from './api.js';
import { targetSelect } from './edit.js';
import { enc, h } from './util.js';

export function stopForm(run, onlyRank, rankList) {
  const target = targetSelect(onlyRank, rankList, 'stop-target');
  const reason = h('input', { type: 'text', id: 'stop-reason', placeholder: 'reason (shown to the program)', size: 28 });
  const mode = h('select', { id: 'stop-mode' }, h('option', { value: 'graceful', text: 'graceful' }), h('option', { value: 'terminate', text: 'terminate (SIGTERM after grace)' }));
  const grace = h('input', { type: 'text', id: 'stop-grace', value: '30', size: 4, inputmode: 'decimal' });
  const graceLabel = h('label', {}, 'grace ', grace, ' s');
  // every rank saves a checkpoint (ctl.on_checkpoint) at the same step, then stops
  const checkpoint = h('input', { type: 'checkbox', id: 'stop-checkpoint' });
  const checkpointLabel = h('label', { title: 'every rank runs its ctl.on_checkpoint callback at the same step; the answer lists what each stored' }, checkpoint, ' checkpoint first');
  const saved = h('ul', { class: 'acks', id: 'stop-checkpoints' });
  const button = h('button', { type: 'button', class: 'danger', id: 'stop-button', text: 'Stop…' });
  const acks = h('ul', { class: 'acks', id: 'stop-acks' });
  const result = h('div', { class: 'result', id: 'stop-result', 'aria-live': 'polite' });
  const marks = new Map(); // rank -> li
  let armed = null;
  graceLabel.hidden = true;
  mode.addEventListener('change', () => {
    graceLabel.hidden = mode.value !== 'terminate';
  });
  function checkpointVisible() {
    checkpointLabel.hidden = target.value !== 'all'; // run-wide only: every rank, one step
    if (checkpointLabel.hidden) checkpoint.checked = false;
  }
  checkpointVisible();
  target.addEventListener('change', checkpointVisible);

  function showCheckpoint(rank, report) {
    const files = Object.values(report.files || {});
    const size = files.reduce((n, f) => n + (f.size || 0), 0);
    const text = report.ok
      ? `rank ${rank}: checkpoint at step ${report.step} stored (${files.length} file(s), ${size} bytes${report.result ? ', a result' : ''})`
      : `rank ${rank}: no checkpoint: ${report.error}`;
    saved.append(h('li', { class: report.ok ? 'ack-ok' : 'ack-none', 'data-checkpoint-rank': rank, text }));
  }

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
    saved.replaceChildren();
    for (const rank of ranks) mark(rank, 'sent', 'sent');
    const params = new URLSearchParams({ reason: reason.value, mode: mode.value });
    if (mode.value === 'terminate') params.set('grace', grace.value.trim());
    if (checkpoint.checked && to === 'all') params.set('checkpoint', 'true');
    button.disabled = true;
    const r = await api('POST', `/runs/${enc(run)}/ranks/${enc(to)}/stop?${params}`);
    button.disabled = false;
    const body = r.body || {};
    if (body.ranks && typeof body.ranks === 'object') {
      for (const [rank, entry] of Object.entries(body.ranks)) {
        if (entry.outcome === 'no_answer') mark(rank, 'none', 'no answer');
        else if (entry.outcome === 'rejected') mark(rank, 'none', `refused: ${entry.message}`);
        else mark(rank, 'ok', 'acknowledged');
        if (entry.checkpoint) showCheckpoint(rank, entry.checkpoint);
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
    h('div', { class: 'actions' }, target, reason, mode, graceLabel, checkpointLabel, button),
    acks,
    saved,
    result
  );
  return { el, event };
}
