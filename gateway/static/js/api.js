/* runctl console: The HTTP API, with the bearer token typed into the page (sessionStorage: this tab only). */
import { $, notice } from './util.js';

export const TOKEN_KEY = 'runctl-token';
export const ROLES = ['read', 'write', 'admin'];
export const session = { token: sessionStorage.getItem(TOKEN_KEY) || '', role: null, tokens: false };
export const can = (role) => session.role !== null && ROLES.indexOf(session.role) >= ROLES.indexOf(role);

export function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  if (session.token) headers.Authorization = 'Bearer ' + session.token;
  return headers;
}

/** One API call. Never throws: {status, ok, body, message}; status 0: not reachable. */
export async function api(method, path, body) {
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

export async function loadRole() {
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
