/* runctl console. Served by the gateway itself: no build step, no CDN (ES modules, loaded
 * as they are).
 *
 * Everything it shows comes from the gateway's HTTP API, called with the bearer token typed
 * into the page (kept in sessionStorage, i.e. this tab only; never a cookie). Live updates
 * are server-sent events read with fetch (so the token goes in the Authorization header):
 * GET /live (every run) and GET /runs/{run}/live (one run). Curves: uPlot (static/vendor).
 *
 * Pages (stable URLs): /  every run;  /console/RUN  one run;  /console/RUN/RANK  one rank.
 *
 * Modules: util (DOM, formatting), api (token, role, calls), live (the event stream), ranks
 * (liveness, rows), overview and run (the pages), charts, schema (form fields from a JSON
 * schema), edit and stop (the forms), sections (steps, events, changes). */
import { TOKEN_KEY, loadRole, session } from './api.js';
import { overviewPage } from './overview.js';
import { runPage } from './run.js';
import { $ } from './util.js';

export async function main() {
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
