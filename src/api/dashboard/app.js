// tollgate's dashboard. It reads the same REST endpoints as any client
// (/usage, /queries, /limits, /ratelimits), authenticated by the session
// cookie, so every number shown is the API's. Money stays exact decimal
// text from the JSON until it is rounded to the cent for display.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  let session = null;
  let spendChart = null;

  // ---- exact money -------------------------------------------------------

  const MONEY = new Set(['cost', 'averageCostPerQuery', 'budget', 'spent', 'reserved', 'remaining']);

  // Money fields keep their source text: as JSON numbers they would pass
  // through a float and could round to the wrong cent.
  function parseJSON(text) {
    return JSON.parse(text, function (key, value, ctx) {
      if (typeof value === 'number' && MONEY.has(key)) {
        return ctx && typeof ctx.source === 'string' ? ctx.source : String(value);
      }
      return value;
    });
  }

  // A decimal string as an integer of 10^-scale units, truncated.
  function scaled(s, scale) {
    s = String(s).trim();
    if (/e/i.test(s)) s = Number(s).toFixed(scale);
    const neg = s.startsWith('-');
    if (neg || s.startsWith('+')) s = s.slice(1);
    const [i, f = ''] = s.split('.');
    const v = BigInt(i || '0') * 10n ** BigInt(scale) + BigInt((f + '0'.repeat(scale)).slice(0, scale) || '0');
    return neg ? -v : v;
  }
  const pico = (s) => scaled(s, 12);

  // Dollars rounded half up to the cent, e.g. "$1,234.57".
  function money(s) {
    if (s === null || s === undefined) return '—';
    let c = scaled(s, 3);
    const neg = c < 0n;
    if (neg) c = -c;
    c = (c + 5n) / 10n;
    const d = c / 100n, r = c % 100n;
    return (neg ? '-' : '') + '$' + d.toLocaleString('en-US') + '.' + String(r).padStart(2, '0');
  }
  const int = (n) => Number(n).toLocaleString('en-US');

  // ---- plumbing ----------------------------------------------------------

  async function api(path, init) {
    const r = await fetch(path, Object.assign({ credentials: 'same-origin', headers: { Accept: 'application/json' } }, init));
    const text = await r.text();
    let body = null;
    try { body = parseJSON(text); } catch (_) { /* not JSON */ }
    if (!r.ok) {
      const e = new Error(body && body.error ? body.error.message : `HTTP ${r.status}`);
      e.status = r.status;
      throw e;
    }
    return body;
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function row(cells) {
    const tr = document.createElement('tr');
    for (const c of cells) {
      const td = typeof c === 'object' && c !== null && c.nodeType ? c : el('td', c[0], c[1]);
      if (c.title) td.title = c.title;
      tr.appendChild(td);
    }
    return tr;
  }

  const sectionError = (id, msg) => { $(id).querySelector('p.error').textContent = msg || ''; };

  // Runs a section's loader, showing its error in the section; a lost
  // session sends the page back to the login form.
  async function guarded(id, f) {
    sectionError(id, '');
    try { await f(); } catch (e) {
      if (e.status === 401) return showLogin('Your session ended: log in again.');
      sectionError(id, e.message);
    }
  }

  const DAY = 86400000;
  const dayOf = (ms) => new Date(ms).toISOString().slice(0, 10);
  const todayStart = () => Math.floor(Date.now() / DAY) * DAY;
  // `after` is exclusive: one millisecond before the first included instant.
  const afterParam = (ms) => new Date(ms - 1).toISOString();

  // ---- spend over time ---------------------------------------------------

  const COLORS = ['#2f6fde', '#e8833a', '#3aa655', '#c2415d', '#8e5ad1', '#1fa2a8', '#b58b1b', '#6b7a90', '#d45fb4', '#58a0e8'];

  async function loadSpend() {
    const days = Number($('spend-range').value);
    const group = $('spend-group').value;
    const first = todayStart() - (days - 1) * DAY;
    const after = encodeURIComponent(afterParam(first));
    const chartQuery = `usage?group_by=day,${group}&after=${after}`;
    const totalsQuery = `usage?group_by=${group}&after=${after}`;
    const [rows, totals] = await Promise.all([api(chartQuery), api(totalsQuery)]);

    const labels = [];
    for (let t = first; t <= todayStart(); t += DAY) labels.push(dayOf(t));
    totals.sort((a, b) => (pico(b.cost) > pico(a.cost) ? 1 : pico(b.cost) < pico(a.cost) ? -1 : 0));
    const series = totals.map((t, i) => ({
      label: String(t[group]),
      data: labels.map(() => 0),
      exact: labels.map(() => '0'),
      backgroundColor: COLORS[i % COLORS.length],
      stack: 'spend',
    }));
    const byName = new Map(series.map((s) => [s.label, s]));
    for (const r of rows) {
      const s = byName.get(String(r[group]));
      const i = labels.indexOf(r.day);
      if (s && i >= 0) { s.data[i] = Number(r.cost); s.exact[i] = r.cost; }
    }
    if (spendChart) spendChart.destroy();
    spendChart = new Chart($('spend-chart'), {
      type: 'bar',
      data: { labels, datasets: series },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: { x: { stacked: true }, y: { stacked: true, ticks: { callback: (v) => '$' + v } } },
        plugins: {
          legend: { position: 'bottom' },
          tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${money(c.dataset.exact[c.dataIndex])}` } },
        },
      },
    });

    $('spend-key').textContent = group;
    const body = $('spend-totals').tBodies[0];
    body.replaceChildren(...totals.map((t) => row([[String(t[group])], [money(t.cost), 'num']])));
    // What was shown came from these (the browser tests read them back).
    $('spend').dataset.query = chartQuery;
    $('spend').dataset.totalsQuery = totalsQuery;
  }

  // ---- top spenders ------------------------------------------------------

  function periodAfter(p) {
    const now = new Date();
    switch (p) {
      case 'today': return todayStart();
      case 'month': return Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1);
      case 'all': return null;
      default: return todayStart() - (Number(p) - 1) * DAY;
    }
  }

  async function loadTop() {
    const after = periodAfter($('top-period').value);
    const suffix = after === null ? '' : `&after=${encodeURIComponent(afterParam(after))}`;
    const box = $('top-tables');
    const tables = await Promise.all(session.groupings.map(async (g) => {
      const query = `usage?group_by=${g}${suffix}`;
      const rows = await api(query);
      rows.sort((a, b) => (pico(b.cost) > pico(a.cost) ? 1 : pico(b.cost) < pico(a.cost) ? -1 : 0));
      const wrap = el('div');
      wrap.id = `top-${g}`;
      wrap.dataset.query = query;
      wrap.appendChild(el('h3', `Top ${g}s`));
      const t = el('table');
      const head = row([[g], ['Requests', 'num'], ['Tokens', 'num'], ['Cost', 'num']]);
      for (const td of head.children) { const th = el('th', td.textContent, td.className); head.replaceChild(th, td); }
      t.createTHead().appendChild(head);
      const body = t.createTBody();
      for (const r of rows.slice(0, 10)) {
        body.appendChild(row([[String(r[g])], [int(r.numQueries), 'num'],
          [int(r.queryTokens + r.answerTokens), 'num'], [money(r.cost), 'num']]));
      }
      if (!rows.length) body.appendChild(row([['no requests in this period', 'muted']]));
      wrap.appendChild(t);
      return wrap;
    }));
    box.replaceChildren(...tables);
    box.dataset.period = $('top-period').value;
  }

  // ---- budgets -----------------------------------------------------------

  async function loadBudgets() {
    const views = session.role === 'admin'
      ? await api('limits')
      : [await api(`users/${encodeURIComponent(session.user)}/limits`)];
    // Projects' budgets too, for admins (a key holder reads only their own).
    if (session.role === 'admin') {
      for (const p of await api('projects')) {
        if (p.limits) views.push({ ...p.limits, project: p.name });
      }
    }
    const now = Date.now();
    const body = $('budget-table').tBodies[0];
    const rows = [];
    for (const v of views) {
      if (v.budget === null || v.budget === undefined) continue;
      const budget = pico(v.budget);
      const used = pico(v.spent || '0') + pico(v.reserved || '0');
      const start = v.periodStart ? Date.parse(v.periodStart) : null;
      const end = v.periodEnd ? Date.parse(v.periodEnd) : null;
      let elapsed = null, projected = null;
      if (start !== null && end !== null && end > start) {
        elapsed = Math.min(1, Math.max(0, (now - start) / (end - start)));
        // The spend so far, continued at the same pace to the period's end.
        if (elapsed > 0) projected = Number(used) / elapsed / 1e12;
      }
      const runsOut = used >= budget || (projected !== null && projected * 1e12 > Number(budget));
      const meter = el('td');
      if (elapsed !== null) {
        const m = el('meter');
        m.min = 0; m.max = 1; m.value = elapsed;
        meter.append(m, ` ${Math.round(elapsed * 100)}%`);
      } else meter.textContent = '—';
      const tr = row([[v.project ? `project ${v.project}` : v.user], [money(v.budget), 'num'], [v.period + (v.default ? ' (default)' : '')],
        [money(v.spent), 'num'], [money(v.reserved), 'num'], [money(v.remaining), 'num'], meter,
        [projected === null ? '—' : money(projected.toFixed(6)), 'num'],
        [runsOut ? (used >= budget ? 'exhausted' : 'runs out before the period ends') : 'on track', 'outlook']]);
      if (runsOut) tr.classList.add('over');
      if (v.project) tr.dataset.project = v.project; else tr.dataset.user = v.user;
      rows.push(tr);
    }
    body.replaceChildren(...rows);
    $('budgets-empty').hidden = rows.length > 0;
  }

  // ---- recent requests ---------------------------------------------------

  function recentQuery() {
    const p = new URLSearchParams({ order: 'desc', limit: $('recent-limit').value });
    const add = (k, v) => { if (v) p.set(k, v); };
    if (session.role === 'admin') add('user', $('recent-user').value.trim());
    add('model', $('recent-model').value.trim());
    add('project', $('recent-project').value.trim());
    add('status', $('recent-status').value);
    add('estimated', $('recent-estimated').value);
    return `queries?${p}`;
  }

  async function loadRecent() {
    const query = recentQuery();
    const rows = await api(query);
    $('recent-table').tBodies[0].replaceChildren(...rows.map((r) => row([
      [r.timestamp.replace('T', ' ').replace('Z', '')], [r.user], [r.model], [r.endpoint],
      [String(r.status), 'num'], [int(r.queryTokens), 'num'], [int(r.answerTokens), 'num'],
      [money(r.cost), 'num'], [r.estimated ? 'estimated' : 'reported'],
    ])));
    $('recent').dataset.query = query;
    $('recent-csv').href = `${query}&format=csv`;
  }

  // ---- upstream rate limits ----------------------------------------------

  async function loadRateLimits() {
    const rl = await api('ratelimits');
    const rows = [];
    for (const name of ['requests', 'tokens']) {
      const l = rl[name];
      if (!l) continue;
      const m = el('td');
      if (l.maximum) {
        const bar = el('meter');
        bar.min = 0; bar.max = l.maximum; bar.value = l.remaining || 0;
        bar.low = l.maximum * 0.2; bar.optimum = l.maximum;
        m.append(bar, ` ${Math.round(((l.remaining || 0) / l.maximum) * 100)}%`);
      } else m.textContent = '—';
      rows.push(row([[name], [l.remaining === undefined ? '—' : int(l.remaining), 'num'],
        [l.maximum === undefined ? '—' : int(l.maximum), 'num'], m, [l.reset || '—']]));
    }
    $('ratelimit-table').tBodies[0].replaceChildren(...rows);
    $('ratelimits-empty').hidden = rows.length > 0;
  }

  // ---- session -----------------------------------------------------------

  function showLogin(msg) {
    session = null;
    $('main').hidden = true;
    $('logout').hidden = true;
    $('who').textContent = '';
    $('login').hidden = false;
    $('login-error').textContent = msg || '';
    $('login-key').focus();
  }

  function showMain() {
    $('login').hidden = true;
    $('main').hidden = false;
    $('who').textContent = session.role === 'admin' ? 'admin' : `key holder: ${session.user}`;
    $('logout').hidden = !session.csrf;
    const admin = session.role === 'admin';
    $('ratelimits').hidden = !admin;
    $('recent-user-label').hidden = !admin;
    const pick = $('spend-group');
    pick.replaceChildren(...session.groupings.map((g) => { const o = el('option', g); o.value = g; return o; }));
    pick.value = session.groupings.includes('model') ? 'model' : session.groupings[0];
    guarded('spend', loadSpend);
    guarded('top', loadTop);
    guarded('budgets', loadBudgets);
    guarded('recent', loadRecent);
    if (admin) guarded('ratelimits', loadRateLimits);
  }

  async function start() {
    $('login-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      $('login-error').textContent = '';
      try {
        session = await api('dashboard/login', {
          method: 'POST',
          headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
          body: JSON.stringify({ key: $('login-key').value }),
        });
        $('login-key').value = '';
        showMain();
      } catch (e) {
        $('login-error').textContent = e.message;
      }
    });
    $('logout').addEventListener('click', async () => {
      try {
        await api('dashboard/logout', { method: 'POST', headers: { 'x-tollgate-csrf': session.csrf } });
      } finally { showLogin(''); }
    });
    $('spend-range').addEventListener('change', () => guarded('spend', loadSpend));
    $('spend-group').addEventListener('change', () => guarded('spend', loadSpend));
    $('top-period').addEventListener('change', () => guarded('top', loadTop));
    $('recent-filters').addEventListener('submit', (ev) => { ev.preventDefault(); guarded('recent', loadRecent); });
    for (const id of ['recent-status', 'recent-estimated', 'recent-limit']) {
      $(id).addEventListener('change', () => guarded('recent', loadRecent));
    }
    try {
      session = await api('dashboard/session');
      showMain();
    } catch (e) {
      showLogin(e.status === 401 ? '' : e.message);
    }
  }

  start();
})();
