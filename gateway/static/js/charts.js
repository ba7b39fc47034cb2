/* runctl console: Curves of every numeric state field and of the step rate, all ranks overlaid (uPlot). */
import { debounce, fmtNum, h, rankOrder } from './util.js';

export const PALETTE = ['#2f6fde', '#e0542c', '#1a9c5b', '#9b4dca', '#d19a00', '#0aa2b5', '#c2185b', '#5d6d7e', '#7cb342', '#8d6e63'];
export const rankColor = (rank, i) => (i < PALETTE.length ? PALETTE[i] : `hsl(${(i * 47) % 360} 60% 45%)`);
export const STEP_RATE = '@step_rate';
export const MAX_POINTS = 3600;

export class Charts {
  constructor(container, onlyRank) {
    this.el = container;
    this.onlyRank = onlyRank;
    this.series = new Map(); // key -> Map(rank -> Map(second -> value))
    this.plots = new Map(); // key -> {plot, ranks, box}
    this.dirty = new Set();
    this.order = [STEP_RATE];
    this.busy = 0;
    this.timer = setInterval(() => this.flush(), 1000);
    this.resize = debounce(() => {
      for (const p of this.plots.values()) p.plot.setSize({ width: this.width(p.box), height: 170 });
    }, 200);
    window.addEventListener('resize', this.resize);
  }

  add(key, rank, t, value) {
    if (this.onlyRank !== undefined && rank !== this.onlyRank) return;
    let perRank = this.series.get(key);
    if (!perRank) {
      perRank = new Map();
      this.series.set(key, perRank);
      if (!this.order.includes(key)) this.order.push(key);
    }
    let points = perRank.get(rank);
    if (!points) perRank.set(rank, (points = new Map()));
    // one point per rank and second: heartbeats of every rank then share x values
    const second = Math.round(t);
    points.delete(second);
    points.set(second, value === undefined ? null : value);
    if (points.size > MAX_POINTS) points.delete(points.keys().next().value);
    this.dirty.add(key);
  }

  /** A state message (live) or one point of GET /runs/{run}/series. */
  point(rank, t, stepRate, numbers) {
    this.add(STEP_RATE, rank, t, stepRate);
    for (const [name, value] of Object.entries(numbers || {})) this.add(name, rank, t, value);
  }

  load(series) {
    for (const [rank, s] of Object.entries(series.ranks || {})) {
      for (let i = 0; i < s.t.length; i++) {
        const numbers = {};
        for (const [name, column] of Object.entries(s.fields)) numbers[name] = column[i];
        this.point(rank, s.t[i], s.step_rate[i], numbers);
      }
    }
    this.flush();
  }

  width(box) {
    return Math.max(280, box.clientWidth - 14);
  }

  flush() {
    if (this.busy > 0) {
      this.busy -= 1; // a slow machine: draw less often
      return;
    }
    const started = performance.now();
    const keys = this.order.filter((k) => this.dirty.has(k));
    this.dirty.clear();
    for (const key of keys) this.draw(key);
    this.busy = Math.min(10, Math.floor((performance.now() - started) / 200));
  }

  draw(key) {
    const perRank = this.series.get(key);
    if (!perRank) return;
    const ranks = [...perRank.keys()].sort(rankOrder);
    const xs = new Set();
    for (const points of perRank.values()) for (const second of points.keys()) xs.add(second);
    const x = [...xs].sort((a, b) => a - b);
    const index = new Map(x.map((second, i) => [second, i]));
    let count = 0;
    const columns = ranks.map((rank) => {
      const column = new Array(x.length).fill(null);
      for (const [second, value] of perRank.get(rank)) {
        column[index.get(second)] = value;
        if (value !== null) count += 1;
      }
      return column;
    });
    const data = [x, ...columns];
    let entry = this.plots.get(key);
    if (entry && entry.ranks.join() !== ranks.join()) {
      entry.plot.destroy();
      entry.box.remove();
      this.plots.delete(key);
      entry = undefined;
    }
    if (!entry) {
      const label = key === STEP_RATE ? 'step rate (steps/s)' : key;
      const box = h('div', { class: 'chart', 'data-field': key === STEP_RATE ? 'step_rate' : key });
      this.place(key, box);
      const plot = new uPlot(
        {
          width: this.width(box),
          height: 170,
          title: label,
          scales: { x: { time: true } },
          cursor: { drag: { x: true, y: false } },
          series: [
            {},
            ...ranks.map((rank, i) => ({
              label: `rank ${rank}`,
              stroke: rankColor(rank, i),
              width: 1.5,
              spanGaps: true,
              points: { show: false },
              value: (u, v) => fmtNum(v),
            })),
          ],
          axes: [
            { stroke: '#6b7280', grid: { stroke: '#eef0f3' }, ticks: { stroke: '#e3e6eb' } },
            { stroke: '#6b7280', size: 60, grid: { stroke: '#eef0f3' }, ticks: { stroke: '#e3e6eb' } },
          ],
        },
        data,
        box
      );
      entry = { plot, ranks, box };
      this.plots.set(key, entry);
    } else {
      entry.plot.setData(data);
    }
    entry.box.dataset.points = String(count);
  }

  place(key, box) {
    // keep the order: step rate first, then the fields in the order they first appeared
    const position = this.order.indexOf(key);
    for (const other of this.order.slice(position + 1)) {
      const next = this.plots.get(other);
      if (next) {
        this.el.insertBefore(box, next.box);
        return;
      }
    }
    this.el.append(box);
  }
}
