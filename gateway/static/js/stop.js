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
