// Pollinate dashboard: renders the state the server pushes over /api/events (server-sent events).
// Every value from the run is placed with textContent or drawn on a canvas: never parsed as HTML.
(function () {
  "use strict";

  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
  const $ = (id) => document.getElementById(id);
  let state = null;
  let selected = 0;
  const charts = {};

  // --- formatting ------------------------------------------------------------------------------------
  function num(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(2) + " " + units[i];
  }
  function short(value) {  // two significant digits, exponent form only when tiny or huge (δ = 1e-5)
    return value === null || value === undefined ? "–" : String(Number(Number(value).toPrecision(2)));
  }
  function epsilon(privacy) {  // null ε: no noise, so no guarantee
    if (!privacy) return "–";
    return privacy.epsilon === null ? "∞" : num(privacy.epsilon, 2);
  }
  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function byClientId(a, b) {
    const x = Number(a.id), y = Number(b.id);
    if (Number.isFinite(x) && Number.isFinite(y)) return x - y;
    return String(a.id).localeCompare(String(b.id));
  }

  // --- tables ----------------------------------------------------------------------------------------
  function fillTable(table, columns, rows, rowClass) {
    const head = table.tHead.rows[0];
    head.replaceChildren(...columns.map((c) => el("th", c.title, c.text ? "text" : "")));
    const body = table.tBodies[0];
    body.replaceChildren(...rows.map((row) => {
      const tr = document.createElement("tr");
      const cls = rowClass ? rowClass(row) : "";
      if (cls) tr.className = cls;
      for (const c of columns) {
        const td = el("td", null, c.cls || (c.text ? "text" : ""));
        const value = c.value(row);
        if (value instanceof Node) td.appendChild(value); else td.textContent = value;
        tr.appendChild(td);
      }
      return tr;
    }));
  }

  function statusBadge(client) {
    const kind = client.status || "planned";
    const words = { ok: "met deadline", missed: "missed deadline", rejected: "rejected", planned: "planned" };
    return el("span", words[kind] || kind, "badge " + kind);
  }

  // FedPipe plans each client's compute: its estimate stands beside what the client measured.
  function computeText(client) {
    const measured = num(client.compute_seconds, 2);
    return client.estimated_compute_seconds == null
      ? measured
      : measured + " (" + num(client.estimated_compute_seconds, 2) + ")";
  }

  function deadlineCell(client, deadline) {
    const wrap = el("span", num(client.round_seconds, 2));
    if (deadline && client.round_seconds !== undefined) {
      const bar = el("span", null, client.round_seconds > deadline ? "bar over" : "bar");
      const fill = el("span");
      fill.style.width = Math.min(100, (100 * client.round_seconds) / deadline).toFixed(1) + "%";
      bar.appendChild(fill);
      bar.title = num(client.round_seconds, 2) + " s of the " + num(deadline, 1) + " s deadline";
      wrap.appendChild(bar);
    }
    return wrap;
  }

  function planText(plan) {
    if (!plan) return "–";
    const ranks = Object.entries(plan.ranks || {}).map(([r, n]) => "r" + r + "×" + n).join(" ");
    return ranks || "–";
  }

  function clientColumns(run) {
    const clients = run.clients;
    const has = (key) => clients.some((c) => c[key] !== undefined);
    const hasPlan = clients.some((c) => c.plan);
    const deadline = run.header.deadline_s;
    const cols = [
      { title: "client", text: true, value: (c) => c.id },
      { title: "profile", text: true, value: (c) => c.profile || "–" },
      { title: "round", value: (c) => (c.round === undefined || c.round === null ? "–" : c.round) },
      { title: "status", text: true, value: statusBadge },
    ];
    if (hasPlan) {
      cols.push(
        { title: "modules", value: (c) => (c.plan ? num(c.plan.modules, 0) : "–") },
        { title: "ranks", text: true, value: (c) => planText(c.plan) },
        { title: "bits", value: (c) => (c.plan ? num(c.plan.bits, 0) : "–") },
        { title: "batch", value: (c) => (c.plan ? num(c.plan.batch_size, 0) : "–") },
        { title: "steps", value: (c) => (c.plan ? num(c.plan.local_steps, 0) : "–") },
      );
    }
    cols.push(
      { title: "up / down (round)", value: (c) => bytes(c.bytes_up) + " / " + bytes(c.bytes_down) },
      { title: "up / down (all rounds)", value: (c) => bytes(c.total_bytes_up) + " / " + bytes(c.total_bytes_down) },
      { title: "compute (plan's estimate) / comm s", value: (c) => computeText(c) + " / " + num(c.comm_seconds, 2) },
      { title: deadline ? "round s / deadline" : "round s", text: true, value: (c) => deadlineCell(c, deadline) },
      { title: "train loss", value: (c) => num(c.train_loss, 4) },
      { title: "examples", value: (c) => num(c.num_examples, 0) },
    );
    if (has("split_bytes_up")) {
      cols.push(
        { title: "split up", value: (c) => bytes(c.split_bytes_up) },
        { title: "split down", value: (c) => bytes(c.split_bytes_down) },
        { title: "kept", value: (c) => num(c.kept_examples, 0) },
      );
    }
    cols.push({ title: "reason", text: true, cls: "reason", value: (c) => c.reason || "" });
    return cols;
  }

  function renderClients(run) {
    const clients = run.clients.slice().sort(byClientId);
    fillTable($("clients-table"), clientColumns(run), clients,
      (c) => (c.status === "rejected" ? "rejected" : c.status === "missed" ? "missed" : ""));
    $("clients-empty").hidden = clients.length > 0;
    $("deadline").textContent = run.header.deadline_s ? "(round deadline " + num(run.header.deadline_s, 1) + " s)" : "";
  }

  function renderRounds(run) {
    const metric = run.metric_name || "metric";
    const hasClientEval = run.rounds.some((r) => r.client_mean_metric !== undefined);
    const cols = [
      { title: "round", value: (r) => r.round },
      { title: "train loss", value: (r) => num(r.train_loss, 4) },
      { title: "eval loss", value: (r) => num(r.eval_loss, 4) },
      { title: metric.replace(/_/g, " "), value: (r) => num(r.metric, 3) },
    ];
    if (hasClientEval) {
      cols.push(
        { title: "clients' mean", value: (r) => num(r.client_mean_metric, 3) },
        { title: "worst client", value: (r) => (r.client_worst_id === undefined ? "–" :
          num(r.client_worst_metric, 3) + " (" + r.client_worst_id + ")") },
      );
    }
    if (run.rounds.some((r) => r.privacy)) {
      cols.push({ title: "ε", value: (r) => (r.round === 0 ? "" : epsilon(r.privacy)) });
    }
    cols.push(
      { title: "replied", value: (r) => (r.round === 0 ? "" : r.replied || 0) },
      { title: "missed", value: (r) => (r.round === 0 ? "" : r.missed || 0) },
      { title: "rejected", value: (r) => (r.round === 0 ? "" : r.rejected || 0) },
      { title: "up", value: (r) => (r.round === 0 ? "" : bytes(r.bytes_up)) },
      { title: "down", value: (r) => (r.round === 0 ? "" : bytes(r.bytes_down)) },
      { title: "seconds", value: (r) => num(r.seconds, 1) },
      { title: "note", text: true, cls: "reason", value: (r) => (r.round === 0 ? "before training" : r.skipped ? "skipped: " + r.skipped : r.done ? "" : "in progress") },
    );
    const rows = run.rounds.slice().reverse();
    fillTable($("rounds-table"), cols, rows, (r) => (r.done || r.round === 0 ? "" : "current"));
  }

  function renderRejections(run) {
    $("rejections-card").hidden = run.rejections.length === 0;
    const cols = [
      { title: "round", value: (r) => (r.round === null ? "–" : r.round) },
      { title: "client", text: true, value: (r) => r.client },
      { title: "reason", text: true, cls: "reason", value: (r) => r.reason },
    ];
    fillTable($("rejections-table"), cols, run.rejections.slice().reverse());
  }

  // --- summary ---------------------------------------------------------------------------------------
  function renderSummary(run) {
    const h = run.header, s = run.status;
    const title = [h.method, h.task && "on " + h.task, h.model && "(" + h.model + ")"].filter(Boolean).join(" ");
    $("title").textContent = title || run.name;
    const done = run.rounds.filter((r) => r.done);
    const last = done.length ? done[done.length - 1] : run.rounds.find((r) => r.round === 0);
    if (s.in_progress) {
      $("stat-round").textContent = s.in_progress + (h.rounds ? " / " + h.rounds : "");
      $("stat-round-note").textContent = run.waiting ? "waiting for clients: " + run.waiting.joined + " of " +
        run.waiting.needed + " joined" : "in progress · " + s.replied + (h.clients ? " of " + h.clients : "") +
        " clients replied";
    } else {
      $("stat-round").textContent = s.last_done + (h.rounds ? " / " + h.rounds : "");
      $("stat-round-note").textContent = s.finished ? "run finished" : !s.last_done ? "no round has started" :
        h.rounds && s.last_done >= h.rounds ? "writing the report" : "between rounds";
    }
    $("stat-loss").textContent = last ? num(last.eval_loss, 4) : "–";
    const initial = run.rounds.find((r) => r.round === 0);
    $("stat-loss-note").textContent = initial && last && last !== initial ? "from " + num(initial.eval_loss, 4) +
      " before training" : "";
    $("stat-metric-label").textContent = (run.metric_name || "metric").replace(/_/g, " ");
    $("stat-metric").textContent = last ? num(last.metric, 3) : "–";
    $("stat-metric-note").textContent = last && last.client_mean_metric !== undefined ?
      "clients' mean " + num(last.client_mean_metric, 3) + ", worst " + num(last.client_worst_metric, 3) : "";
    const up = done.reduce((a, r) => a + (r.bytes_up || 0), 0), down = done.reduce((a, r) => a + (r.bytes_down || 0), 0);
    $("stat-bytes").textContent = bytes(up + down);
    $("stat-bytes-note").textContent = "up " + bytes(up) + " · down " + bytes(down);
    const count = (status) => run.clients.filter((c) => c.status === status).length;
    $("stat-clients").textContent = run.clients.length + (h.clients ? " / " + h.clients : "");
    $("stat-clients-note").textContent = count("ok") + " met · " + count("missed") + " missed · " +
      count("rejected") + " rejected";
    renderPrivacy(run.privacy);
    $("skipped").textContent = s.skipped_lines ? s.skipped_lines + (s.skipped_lines === 1 ? " unreadable line" :
      " unreadable lines") + " of metrics.jsonl skipped." : "";
  }

  function renderPrivacy(p) {
    $("privacy-card").hidden = !p;
    if (!p) return;
    $("stat-epsilon").textContent = epsilon(p);
    const parts = ["δ " + short(p.delta), "after round " + p.round];
    if (p.epsilon === null) parts.push("no noise: no guarantee");
    if (p.clipped_fraction !== undefined) parts.push(num(100 * p.clipped_fraction, 0) + "% clipped");
    $("stat-epsilon-note").textContent = parts.join(" · ");
    $("privacy-card").title = "noise multiplier " + short(p.noise_multiplier) + ", clip norm " + short(p.clip_norm);
  }

  // --- charts ----------------------------------------------------------------------------------------
  function lineChart(id, options) {
    if (!charts[id]) {
      charts[id] = new Chart($(id), {
        type: "line", data: { datasets: [] },
        options: Object.assign({ animation: false, responsive: true, maintainAspectRatio: false, parsing: false,
          interaction: { mode: "nearest", intersect: false }, plugins: { legend: { labels: { boxWidth: 12 } } } },
        options),
      });
    }
    return charts[id];
  }

  function series(label, points, color, extra) {
    return Object.assign({ label: label, data: points, borderColor: color, backgroundColor: color,
      pointRadius: 3, borderWidth: 2, spanGaps: true }, extra || {});
  }

  function points(rows, key) {
    return rows.filter((r) => r[key] !== undefined && r[key] !== null).map((r) => ({ x: r.round, y: r[key] }));
  }

  function renderRoundChart(run) {
    const metric = (run.metric_name || "metric").replace(/_/g, " ");
    const chart = lineChart("chart-rounds", { scales: {
      x: { type: "linear", title: { display: true, text: "round" }, ticks: { precision: 0 } },
      y: { title: { display: true, text: "loss" } },
      y1: { position: "right", min: 0, max: 1, title: { display: true, text: metric }, grid: { drawOnChartArea: false } },
    } });
    const rows = run.rounds;
    const sets = [
      series("eval loss", points(rows, "eval_loss"), COLORS[0], { yAxisID: "y" }),
      series("train loss", points(rows, "train_loss"), COLORS[4], { yAxisID: "y", borderDash: [4, 3] }),
      series(metric, points(rows, "metric"), COLORS[2], { yAxisID: "y1" }),
    ];
    if (rows.some((r) => r.client_mean_metric !== undefined)) {
      sets.push(series("clients' mean " + metric, points(rows, "client_mean_metric"), COLORS[5], { yAxisID: "y1", borderDash: [6, 3] }));
      sets.push(series("worst client " + metric, points(rows, "client_worst_metric"), COLORS[1], { yAxisID: "y1", borderDash: [2, 2] }));
    }
    chart.options.scales.y1.title.text = metric;
    chart.data.datasets = sets;
    chart.update();
  }

  function renderBytesChart() {
    const chart = lineChart("chart-bytes", { scales: {
      x: { type: "linear", title: { display: true, text: "cumulative bytes (up + down)" },
        ticks: { callback: (value) => bytes(value) } },
      y: { title: { display: true, text: "eval loss" } },
    } });
    chart.data.datasets = state.runs.map((run, i) => series(run.name, run.rounds
      .filter((r) => r.eval_loss !== undefined && (r.done || r.round === 0))
      .map((r) => ({ x: r.cum_bytes, y: r.eval_loss })), COLORS[i % COLORS.length],
      { borderWidth: i === selected ? 3 : 1.5 }));
    chart.update();
  }

  function renderSplitChart(run) {
    const rows = run.rounds.filter((r) => r.split_bytes_up !== undefined);
    $("split-card").hidden = rows.length === 0;
    if (!rows.length) return;
    if (!charts["chart-split"]) {
      charts["chart-split"] = new Chart($("chart-split"), {
        type: "bar", data: { labels: [], datasets: [] },
        options: { animation: false, responsive: true, maintainAspectRatio: false,
          scales: { x: { stacked: true, title: { display: true, text: "round" } },
            y: { stacked: true, title: { display: true, text: "split-plane MB" } },
            y1: { position: "right", title: { display: true, text: "kept examples" }, grid: { drawOnChartArea: false } } } },
      });
    }
    const chart = charts["chart-split"];
    chart.data.labels = rows.map((r) => r.round);
    chart.data.datasets = [
      { label: "up (client → server)", data: rows.map((r) => r.split_bytes_up / 1e6), backgroundColor: COLORS[0], stack: "mb" },
      { label: "down (server → client)", data: rows.map((r) => r.split_bytes_down / 1e6), backgroundColor: COLORS[5], stack: "mb" },
      { type: "line", label: "kept examples", data: rows.map((r) => r.kept_examples), borderColor: COLORS[4],
        backgroundColor: COLORS[4], yAxisID: "y1" },
    ];
    chart.update();
  }

  // --- FedPipe heat map ------------------------------------------------------------------------------
  function rankColor(rank, maxRank) {
    if (!rank) return "#e5e7eb";
    const t = Math.log2(rank) / Math.max(1, Math.log2(maxRank));  // ranks are powers of two mostly
    const a = [219, 234, 254], b = [30, 64, 175];
    const c = a.map((v, i) => Math.round(v + (b[i] - v) * t));
    return "rgb(" + c.join(",") + ")";
  }

  function shortModule(name) {
    // "model.layers.3.self_attn.q_proj" -> "3.q_proj": the layer and the projection say which module it is
    const parts = String(name).split(".");
    const layer = parts.find((p) => /^\d+$/.test(p));
    return (layer !== undefined ? layer + "." : "") + parts[parts.length - 1];
  }

  function renderHeatmap(run) {
    const heat = run.heatmap;
    $("heatmap-card").hidden = !heat;
    if (!heat) return;
    const canvas = $("heatmap"), ctx = canvas.getContext("2d");
    const labelW = 90, top = 4, cellH = 18;
    const cellW = Math.max(3, Math.min(40, Math.floor(1100 / Math.max(1, heat.modules.length))));
    const named = cellW >= 14;  // room for a short module name under each column
    const bottom = named ? 70 : 4;
    canvas.width = labelW + cellW * heat.modules.length + 4;
    canvas.height = top + cellH * heat.clients.length + bottom;
    const maxRank = Math.max(1, ...heat.ranks.flat());
    ctx.font = "12px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    heat.clients.forEach((client, row) => {
      ctx.fillStyle = "#1d2330";
      ctx.fillText("client " + String(client).slice(0, 10), 2, top + row * cellH + cellH / 2);
      heat.ranks[row].forEach((rank, col) => {
        ctx.fillStyle = rankColor(rank, maxRank);
        ctx.fillRect(labelW + col * cellW, top + row * cellH, cellW - (cellW > 4 ? 1 : 0), cellH - 1);
      });
    });
    if (named) {
      ctx.fillStyle = "#6b7280";
      ctx.font = "11px system-ui, sans-serif";
      heat.modules.forEach((module, col) => {
        ctx.save();
        ctx.translate(labelW + col * cellW + cellW / 2, top + cellH * heat.clients.length + 6);
        ctx.rotate(Math.PI / 3);
        ctx.fillText(shortModule(module), 0, 0);
        ctx.restore();
      });
    }
    canvas.onmousemove = (ev) => {
      const box = canvas.getBoundingClientRect();
      const col = Math.floor((ev.clientX - box.left - labelW) / cellW), row = Math.floor((ev.clientY - box.top - top) / cellH);
      if (col < 0 || row < 0 || row >= heat.clients.length || col >= heat.modules.length) return;
      $("heatmap-readout").textContent = "client " + heat.clients[row] + " · " + heat.modules[col] + " · rank " +
        (heat.ranks[row][col] || "not adapted");
    };
    const ranks = [...new Set(heat.ranks.flat())].sort((a, b) => a - b);
    $("heatmap-legend").replaceChildren(...ranks.map((rank) => {
      const item = el("span", rank ? "rank " + rank : "not adapted");
      const chip = el("span", null, "chip");
      chip.style.background = rankColor(rank, maxRank);
      item.prepend(chip);
      return item;
    }));
  }

  // --- run picker, connection ------------------------------------------------------------------------
  function renderPicker() {
    const picker = $("run-select");
    $("run-picker").hidden = state.runs.length < 2;
    const names = state.runs.map((r) => r.name);
    if (picker.options.length !== names.length || names.some((n, i) => picker.options[i].textContent !== n)) {
      picker.replaceChildren(...names.map((name, i) => { const o = el("option", name); o.value = String(i); return o; }));
    }
    selected = Math.min(selected, state.runs.length - 1);
    picker.value = String(selected);
  }

  function render() {
    if (!state || !state.runs.length) return;
    renderPicker();
    const run = state.runs[selected];
    $("root").textContent = state.root;
    renderSummary(run);
    renderRoundChart(run);
    renderBytesChart();
    renderSplitChart(run);
    renderClients(run);
    renderHeatmap(run);
    renderRounds(run);
    renderRejections(run);
    const finished = state.runs.every((r) => r.status.finished);
    document.body.dataset.status = finished ? "finished" : "running";
    document.body.dataset.roundsDone = String(run.status.last_done);
    setConnection(finished ? "finished" : "live", finished ? "run finished" : "live");
  }

  function setConnection(kind, text) {
    const pill = $("connection");
    pill.className = "pill " + kind;
    pill.textContent = text;
  }

  function connect() {
    const source = new EventSource("/api/events");
    source.addEventListener("state", (ev) => {
      state = JSON.parse(ev.data);
      document.body.dataset.version = String(state.version);
      document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
      render();
    });
    source.onerror = () => {
      const finished = state && state.runs.every((r) => r.status.finished);
      setConnection(finished ? "finished" : "lost", finished ? "run finished · dashboard closed" : "reconnecting…");
    };
  }

  $("run-select").addEventListener("change", (ev) => { selected = Number(ev.target.value) || 0; render(); });
  connect();
})();
