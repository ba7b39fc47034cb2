/* runctl console: live updates, server-sent events read with fetch (the token goes in the
 * Authorization header, which EventSource cannot send), reconnecting by itself. */
import { authHeaders } from './api.js';
import { $, sleep } from './util.js';

export const liveRule = { beats: 3, floor: 1.5 };

export class Live {
  constructor(path, handlers) {
    this.path = path;
    this.handlers = handlers;
    this.controller = null;
    this.stopped = false;
    this.delay = 1000;
  }

  start() {
    this.stopped = false;
    this.loop();
    return this;
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  async loop() {
    while (!this.stopped) {
      this.controller = new AbortController();
      try {
        const response = await fetch(this.path, {
          headers: authHeaders({ Accept: 'text/event-stream' }),
          signal: this.controller.signal,
          credentials: 'omit',
          cache: 'no-store',
        });
        if (!response.ok || !response.body) throw new Error(String(response.status));
        this.delay = 1000;
        await this.read(response.body);
      } catch (err) {
        if (this.stopped) return;
      }
      if (this.stopped) return;
      indicator(false, 'reconnecting');
      await sleep(this.delay);
      this.delay = Math.min(this.delay * 2, 10000);
    }
  }

  async read(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = 'message';
        let data = '';
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) event = line.slice(6).trim();
          else if (line.startsWith('data:')) data += line.slice(5).trim();
        }
        if (!data) continue;
        let parsed;
        try {
          parsed = JSON.parse(data);
        } catch (err) {
          continue;
        }
        if (event === 'hello') {
          liveRule.beats = parsed.stale_after_beats;
          liveRule.floor = parsed.stale_floor_s;
          indicator(true, 'live');
        }
        const handler = this.handlers[event];
        if (handler) handler(parsed);
      }
    }
  }
}

export function indicator(on, text) {
  const el = $('#live');
  el.className = 'live ' + (on ? 'on' : 'off');
  el.lastChild.textContent = text;
}

export let current = null;
/** The page's live stream; stopped when the page goes (the gateway then drops its bridge). */
export function follow(live) {
  current = live;
  return live;
}
window.addEventListener('pagehide', () => current && current.stop());
