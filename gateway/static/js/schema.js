/* runctl console: Form fields generated from a JSON schema, and pydantic's errors placed at them. */
import { h } from './util.js';

export function deref(schema, root) {
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
export function describe(schema, root) {
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

export function constraintHint(d) {
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

export const NUMBER = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/;
export const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

/** One editable field: its control, how to read and set it, where its error goes. */
export function makeField(path, d, value) {
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

export function buildFields(schema, root, state, path, fields, depth) {
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

export function valueAt(state, path) {
  let v = state;
  for (const k of path) {
    if (v === null || typeof v !== 'object') return undefined;
    v = v[k];
  }
  return v;
}

export function assignPath(target, path, value) {
  let node = target;
  for (const k of path.slice(0, -1)) {
    if (!node[k] || typeof node[k] !== 'object') node[k] = {};
    node = node[k];
  }
  node[path[path.length - 1]] = value;
}

/** pydantic's errors, each at the field its `loc` names (or the nearest group). */
export function showErrors(fields, errors, general) {
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
