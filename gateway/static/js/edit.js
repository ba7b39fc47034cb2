/* runctl console: The change form: one patch to one rank or to all (optionally at the same step). */
import { api } from './api.js';
import { assignPath, buildFields, deref, showErrors, valueAt } from './schema.js';
import { enc, h, rankOrder } from './util.js';

export function targetSelect(onlyRank, rankList, id) {
  const select = h('select', { id });
  if (onlyRank !== undefined) {
    select.append(h('option', { value: onlyRank, text: `rank ${onlyRank}` }));
  } else {
    select.append(h('option', { value: 'all', text: 'all ranks' }));
    for (const rank of rankList()) select.append(h('option', { value: rank, text: `rank ${rank}` }));
  }
  return select;
}

export function editForm(run, schema, states, onlyRank, rankList) {
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
