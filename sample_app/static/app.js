/* The trading desk page: /trading for orders and trades, /monitor for pool statistics.
   Socket.IO reconnects by itself; the badges show where each connection stands. */
(function () {
  "use strict";

  var MAX_ROWS = 100; // rows kept in the orders and trades tables
  var CHART_SECONDS = 120; // the chart shows the last two minutes
  var MAX_POINTS = 600; // points kept (one per monitor push and worker)
  var ACK_TIMEOUT = 10000;

  function $(id) { return document.getElementById(id); }

  function el(tag, text, className) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function num(value, digits) {
    if (value === null || value === undefined) return "–";
    return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 4 : digits });
  }

  // Amounts arrive as exact decimal strings ("1.5"): shown as they are, never via a float.
  function amount(value) {
    return value === null || value === undefined ? "–" : String(value);
  }

  function fixed(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function clock(epochSeconds) {
    return new Date(epochSeconds * 1000).toLocaleTimeString("en-GB", { hour12: false });
  }

  function setBadge(node, state, text) {
    node.dataset.state = state;
    node.textContent = text;
  }

  // Re-render at most once per animation frame, however many events arrive.
  function throttled(render) {
    var pending = false;
    return function () {
      if (pending) return;
      pending = true;
      window.requestAnimationFrame(function () { pending = false; render(); });
    };
  }

  // ---------------------------------------------------------------- /trading

  var trading = io("/trading");
  var orders = new Map();
  var trades = new Map();

  function watchConnection(socket, badge, name) {
    socket.on("connect", function () { setBadge(badge, "connected", name + ": connected"); });
    socket.on("disconnect", function (reason) {
      setBadge(badge, "disconnected", name + ": disconnected (" + reason + ")");
    });
    socket.io.on("reconnect_attempt", function (attempt) {
      setBadge(badge, "reconnecting", name + ": reconnecting… (attempt " + attempt + ")");
    });
  }

  watchConnection(trading, $("trading-state"), "trading");

  trading.on("connect", function () {
    // (Re)load the book: events sent while we were away are not replayed.
    trading.timeout(ACK_TIMEOUT).emit("list_orders", { limit: MAX_ROWS }, function (err, ack) {
      if (err || !ack || !ack.orders) return;
      orders.clear();
      ack.orders.forEach(function (o) { orders.set(o.id, o); });
      renderOrders();
    });
    trading.timeout(ACK_TIMEOUT).emit("list_trades", { limit: MAX_ROWS }, function (err, ack) {
      if (err || !ack || !ack.trades) return;
      trades.clear();
      ack.trades.forEach(function (t) { trades.set(t.id, t); });
      renderTrades();
    });
  });

  function upsertOrder(order) { orders.set(order.id, order); renderOrders(); }
  trading.on("order_placed", upsertOrder);
  trading.on("order_updated", upsertOrder);
  trading.on("trade", function (trade) { trades.set(trade.id, trade); renderTrades(); });

  function newestFirst(a, b) { return b.id - a.id; } // ids grow in the order rows are stored

  function trim(map) {
    var all = Array.from(map.values()).sort(newestFirst);
    all.slice(MAX_ROWS).forEach(function (item) { map.delete(item.id); });
    return all.slice(0, MAX_ROWS);
  }

  var renderOrders = throttled(function () {
    var body = $("orders").tBodies[0];
    var rows = trim(orders).map(function (o) {
      var tr = el("tr");
      tr.dataset.orderId = o.id;
      tr.dataset.status = o.status;
      tr.appendChild(el("td", o.id, "id"));
      tr.appendChild(el("td", clock(o.created_at), "time"));
      tr.appendChild(el("td", o.symbol, "symbol"));
      tr.appendChild(el("td", o.side, "side " + o.side));
      tr.appendChild(el("td", amount(o.qty), "num qty"));
      tr.appendChild(el("td", amount(o.filled_qty), "num filled"));
      tr.appendChild(el("td", amount(o.open_qty), "num open-qty"));
      tr.appendChild(el("td", amount(o.price), "num price"));
      var status = el("td");
      status.appendChild(el("span", o.status, "pill status-" + o.status));
      tr.appendChild(status);
      var action = el("td", null, "action");
      if (o.status === "open") {
        var button = el("button", "Cancel", "link");
        button.type = "button";
        button.addEventListener("click", function () { cancelOrder(o.id); });
        action.appendChild(button);
      }
      tr.appendChild(action);
      return tr;
    });
    body.replaceChildren.apply(body, rows);
    $("orders-count").textContent = rows.length ? "(" + rows.length + ")" : "";
    $("orders-empty").hidden = rows.length > 0;
  });

  var renderTrades = throttled(function () {
    var body = $("trades").tBodies[0];
    var rows = trim(trades).map(function (t) {
      var tr = el("tr");
      tr.dataset.tradeId = t.id;
      tr.dataset.buyOrderId = t.buy_order_id;
      tr.dataset.sellOrderId = t.sell_order_id;
      tr.appendChild(el("td", t.id, "id"));
      tr.appendChild(el("td", clock(t.created_at), "time"));
      tr.appendChild(el("td", t.symbol, "symbol"));
      tr.appendChild(el("td", amount(t.qty), "num qty"));
      tr.appendChild(el("td", amount(t.price), "num price"));
      tr.appendChild(el("td", "#" + t.buy_order_id));
      tr.appendChild(el("td", "#" + t.sell_order_id));
      tr.appendChild(el("td", t.taker_side, "side " + t.taker_side));
      return tr;
    });
    body.replaceChildren.apply(body, rows);
    $("trades-count").textContent = rows.length ? "(" + rows.length + ")" : "";
    $("trades-empty").hidden = rows.length > 0;
  });

  function showResult(text, ok) {
    var node = $("order-result");
    node.textContent = text;
    node.dataset.ok = typeof ok === "string" ? ok : ok ? "true" : "false";
  }

  function describeError(err, ack) {
    if (err) return "No answer from the server (" + (err.message || "timeout") + ")";
    return (ack && ack.message ? ack.message : "Rejected") + (ack && ack.error ? " [" + ack.error + "]" : "");
  }

  // A fresh client order id per order: resending it after a timeout, a busy answer or an
  // unknown outcome can never place the order twice (the server answers a repeat with
  // the first answer).
  function clientOrderId() {
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.from(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  var RESENDS = 3; // after the first try
  var RESEND_CODES = { busy: true, outcome_unknown: true, timeout: true };
  // Once a send's fate is unknown (no answer, outcome_unknown), "the database is down" is
  // no answer either: keep resending the same id, with backoff, for this long.
  var UNCERTAIN_FOR_MS = 30000;

  function placeOrder(order, attempt, done, uncertainSince) {
    trading.timeout(ACK_TIMEOUT).emit("place_order", order, function (err, ack) {
      var code = err ? "no_answer" : ack && ack.error;
      var uncertain = uncertainSince || (code === "no_answer" || code === "outcome_unknown" ? Date.now() : 0);
      var again = (code === "no_answer" || RESEND_CODES[code]) && attempt < RESENDS;
      var stillUnknown = uncertain && (code === "db_unavailable" || again || code === "no_answer" || RESEND_CODES[code]) &&
        Date.now() - uncertain < UNCERTAIN_FOR_MS;
      if (again || stillUnknown) {
        var wait = ack && ack.retry_after_ms ? ack.retry_after_ms : Math.min(500 * Math.pow(2, attempt), 4000);
        showResult("Order not confirmed yet (" + code + "); sending it again…", "pending");
        window.setTimeout(function () { placeOrder(order, attempt + 1, done, uncertain); }, wait);
        return;
      }
      done(err, ack, uncertain && !(ack && ack.ok));
    });
  }

  $("order-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var order = {
      symbol: $("order-symbol").value.trim().toUpperCase(),
      side: $("order-side").value,
      qty: $("order-qty").value.trim(), // as typed: exact decimals, never floats
      price: $("order-price").value.trim(),
      client_order_id: clientOrderId(),
    };
    var button = $("order-submit");
    button.disabled = true;
    placeOrder(order, 0, function (err, ack, unknown) {
      button.disabled = false;
      if (unknown) {
        showResult("Not confirmed: the order may have been placed; check your orders before placing it again", "pending");
        return;
      }
      if (err || !ack || !ack.ok) { showResult(describeError(err, ack), false); return; }
      var o = ack.order;
      var rest = o.status === "open" && o.filled_qty !== "0" ? " (" + o.filled_qty + " filled, " + o.open_qty + " resting)" : "";
      showResult("Order #" + o.id + ": " + o.side + " " + o.qty + " " + o.symbol + " @ " + o.price + " is " + o.status + rest, true);
      upsertOrder(o);
    });
  });

  function cancelOrder(id) {
    trading.timeout(ACK_TIMEOUT).emit("cancel_order", id, function (err, ack) {
      if (!err && ack && ack.ok === false && ack.order) {
        // it filled (or went) first: an answer, not an error
        upsertOrder(ack.order);
        showResult("Order #" + id + " was already " + ack.order.status + "; nothing to cancel", "late");
      } else if (err || !ack || !ack.ok) {
        showResult(describeError(err, ack), false);
      } else {
        upsertOrder(ack.order);
        showResult("Order #" + id + " cancelled", true);
      }
    });
  }

  // ---------------------------------------------------------------- /monitor

  var params = new URLSearchParams(window.location.search);
  var token = params.get("token");
  var workers = new Map(); // worker id -> {payload, seen (ms), rate, interval (s)}
  var points = [[], [], []]; // x (epoch s), utilization %, events/s
  var chart = null;

  function monitorNotice(text) {
    var node = $("monitor-message");
    node.textContent = text || "";
    node.hidden = !text;
  }

  function makeChart() {
    var box = $("chart");
    chart = new uPlot({
      width: Math.max(300, box.clientWidth),
      height: 220,
      cursor: { drag: { x: false, y: false } },
      legend: { live: false },
      scales: {
        x: { time: true, range: function (u, min, max) {
          // grows with the history (30 s at least), then scrolls: the last CHART_SECONDS
          var end = max || Date.now() / 1000;
          var start = min === null || min === undefined ? end : min;
          return [Math.max(Math.min(start, end - 30), end - CHART_SECONDS), end];
        } },
        pct: { range: [0, 100] },
        rate: { range: function (u, min, max) { return [0, Math.max(5, Math.ceil((max || 0) * 1.2))]; } },
      },
      axes: [
        { stroke: "#5b6472", grid: { stroke: "#eef0f3" }, space: 70, values: function (u, v) { return v.map(clock); } },
        { scale: "pct", stroke: "#1a7f64", grid: { stroke: "#eef0f3" }, values: function (u, v) { return v.map(function (x) { return x + "%"; }); } },
        { scale: "rate", side: 1, stroke: "#3563c9", grid: { show: false } },
      ],
      series: [
        {},
        { label: "Pool utilization", scale: "pct", stroke: "#1a7f64", width: 2, fill: "rgba(26,127,100,0.10)", value: function (u, v) { return v === null ? "–" : v.toFixed(1) + " %"; } },
        { label: "Events/s", scale: "rate", stroke: "#3563c9", width: 2, value: function (u, v) { return v === null ? "–" : v.toFixed(1); } },
      ],
    }, points, box);
    window.addEventListener("resize", function () { chart.setSize({ width: Math.max(300, box.clientWidth), height: 220 }); });
  }

  function totalCount(payload) {
    var n = 0;
    Object.keys(payload.events || {}).forEach(function (k) { n += payload.events[k].count; });
    return n;
  }

  function defaultPool(payload) {
    var pools = payload.pools || {};
    return pools["default"] || pools[Object.keys(pools)[0]] || null;
  }

  function live(entry, now) {
    return now - entry.seen <= Math.max(6000, 3000 * entry.interval);
  }

  function receive(payload) {
    if (!payload || !payload.worker) return;
    var previous = workers.get(payload.worker);
    if (previous && previous.payload.timestamp >= payload.timestamp) return; // seen already
    var entry = { payload: payload, seen: Date.now(), rate: 0, interval: 2 };
    if (previous) {
      var dt = payload.timestamp - previous.payload.timestamp;
      entry.interval = dt;
      entry.rate = Math.max(0, (totalCount(payload) - totalCount(previous.payload)) / dt);
    }
    workers.set(payload.worker, entry);
    addPoint(payload.timestamp);
    renderMonitor();
  }

  function totals() {
    var now = Date.now();
    var t = { checkedOut: 0, capacity: 0, waiting: 0, leaks: 0, rate: 0, events: 0, live: 0, status: "unknown" };
    var rank = { unknown: 0, healthy: 1, warning: 2, exhausted: 3, unhealthy: 4, draining: 5 };
    workers.forEach(function (entry) {
      if (!live(entry, now)) return;
      var p = entry.payload;
      var pool = defaultPool(p);
      t.live += 1;
      if (pool) {
        t.checkedOut += pool.checked_out;
        t.capacity += pool.capacity || 0;
        t.waiting += pool.waiting;
      }
      t.leaks += (p.leaks || []).length;
      t.rate += entry.rate;
      t.events += totalCount(p);
      var r = p.status in rank ? rank[p.status] : 3; // a status this page does not know: notable
      if (r > (rank[t.status] || 0)) t.status = p.status;
    });
    t.utilization = t.capacity ? (100 * t.checkedOut) / t.capacity : 0;
    return t;
  }

  function addPoint(timestamp) {
    var t = totals();
    var last = points[0].length ? points[0][points[0].length - 1] : 0;
    if (timestamp - last < 0.25) { // several workers within a moment: one point
      points[1][points[1].length - 1] = t.utilization;
      points[2][points[2].length - 1] = t.rate;
    } else {
      points[0].push(timestamp);
      points[1].push(t.utilization);
      points[2].push(t.rate);
      if (points[0].length > MAX_POINTS) points.forEach(function (a) { a.shift(); });
    }
    if (chart) chart.setData(points);
  }

  var renderMonitor = throttled(function () {
    var now = Date.now();
    var t = totals();
    var dash = "–"; // no live worker (refused, not connected yet, all gone): no numbers
    var any = t.live > 0;
    $("stat-checked-out").textContent = any ? t.checkedOut + (t.capacity ? " / " + t.capacity : "") : dash;
    $("stat-utilization").textContent = any ? t.utilization.toFixed(1) + " %" : dash;
    $("stat-rate").textContent = any ? num(t.rate, 1) : dash;
    $("stat-events").textContent = any ? num(t.events, 0) : dash;
    $("stat-waiting").textContent = any ? t.waiting : dash;
    $("stat-leaks").textContent = any ? t.leaks : dash;
    var pill = $("monitor-status");
    pill.dataset.status = any ? t.status : "unknown";
    pill.textContent = any ? t.status : "no data";

    var workerRows = [];
    var latencyRows = [];
    var leakItems = [];
    workers.forEach(function (entry, id) {
      if (now - entry.seen > 60000) workers.delete(id); // gone for a minute: forget it
    });
    Array.from(workers.keys()).sort().forEach(function (id) {
      var entry = workers.get(id);
      var p = entry.payload;
      var pool = defaultPool(p);
      var stale = !live(entry, now);
      var tr = el("tr", null, stale ? "stale" : "");
      tr.dataset.worker = id;
      tr.appendChild(el("td", id, "mono"));
      var status = el("td");
      var shown = stale ? "gone" : String(p.status);
      var pillNode = el("span", shown, "pill status-" + shown.replace(/[^a-z_-]/gi, ""));
      pillNode.dataset.status = shown;
      status.appendChild(pillNode);
      tr.appendChild(status);
      tr.appendChild(el("td", pool ? pool.checked_out + " / " + (pool.capacity === null ? "∞" : pool.capacity) : "–", "num"));
      tr.appendChild(el("td", pool ? (100 * pool.utilization).toFixed(1) + " %" : "–", "num"));
      tr.appendChild(el("td", pool ? pool.waiting : "–", "num"));
      tr.appendChild(el("td", num(totalCount(p), 0), "num"));
      tr.appendChild(el("td", Math.round((now - entry.seen) / 1000) + " s ago", "num"));
      workerRows.push(tr);
      if (stale) return;

      Object.keys(p.events || {}).sort().forEach(function (key) {
        var e = p.events[key];
        var row = el("tr");
        row.dataset.event = key;
        row.dataset.worker = id;
        var name = el("td", null, "mono event");
        name.title = key;
        key.split(":").forEach(function (part, i) { // may wrap after the namespace
          if (i) { name.appendChild(document.createTextNode(":")); name.appendChild(el("wbr")); }
          name.appendChild(document.createTextNode(part));
        });
        row.appendChild(name);
        var who = el("td", id.split(":").pop(), "mono muted opt");
        who.title = id;
        row.appendChild(who);
        [["count", e.count, 0], ["errors", e.errors, 0], ["busy", e.busy, 0], ["in_flight", e.in_flight, 0],
          ["p50_ms", e.p50_ms, 2], ["p95_ms", e.p95_ms, 2], ["p99_ms", e.p99_ms, 2]].forEach(function (f) {
          var cell = el("td", f[2] ? fixed(f[1], f[2]) : num(f[1], 0), "num");
          cell.dataset.field = f[0];
          if (f[0] === "busy" || f[0] === "in_flight" || f[0] === "p95_ms") cell.classList.add("opt");
          if (f[0] === "errors" && f[1] > 0) cell.classList.add("bad");
          row.appendChild(cell);
        });
        latencyRows.push(row);
      });
      (p.leaks || []).forEach(function (leak) {
        var li = el("li");
        li.appendChild(el("span", num(leak.age_s, 1) + " s", "age"));
        li.appendChild(el("span", " " + (leak.event || "outside an event") + " ", "mono"));
        li.appendChild(el("span", "sid " + (leak.sid || "–") + " · " + id, "muted"));
        leakItems.push(li);
      });
    });
    var wb = $("workers").tBodies[0];
    wb.replaceChildren.apply(wb, workerRows);
    var lb = $("latency").tBodies[0];
    lb.replaceChildren.apply(lb, latencyRows);
    $("latency-empty").hidden = latencyRows.length > 0;
    var leaks = $("leaks");
    leaks.replaceChildren.apply(leaks, leakItems);
    $("leaks-empty").hidden = leakItems.length > 0;
  });

  function startMonitor() {
    var badge = $("monitor-state");
    makeChart();
    if (!token) {
      setBadge(badge, "refused", "monitor: no token");
      monitorNotice("Open the dashboard URL printed at start-up (…/?token=…) to see the pool monitor.");
      return;
    }
    var monitor = io("/monitor", { auth: { token: token } });
    watchConnection(monitor, badge, "monitor");
    monitor.on("connect", function () { monitorNotice(""); });
    monitor.on("connect_error", function (err) {
      if (monitor.active) return; // a transport problem: Socket.IO retries by itself
      setBadge(badge, "refused", "monitor: refused");
      monitorNotice("The server refused the monitor token (" + (err && err.message ? err.message : "refused") + "). Use the URL printed at start-up.");
    });
    monitor.on("pool_status", receive);
    monitor.on("cluster_status", function (cluster) {
      Object.keys((cluster && cluster.workers) || {}).forEach(function (id) { receive(cluster.workers[id]); });
    });
    window.setInterval(renderMonitor, 1000); // keeps "seen" ages and stale workers current
  }

  startMonitor();
})();
