// pgsse demo dashboard, built on the pgsse browser client it serves at /client/*.
// One stream for the page; aggregates fetched with ETags (a refetch is a 304) and refreshed
// by `aggregate.invalidated`; named events drive an invalidation map, as a TanStack Query
// app would (the tiny query cache below has TanStack's invalidateQueries-by-prefix shape).
// Relative to this file, so the dashboard also works where pgsse is mounted under a prefix.
import { createClient } from "../client/index.js";
import { aggregateKey, aggregateQuery, aggregateStats, connectQueryClient, hashKey } from "../client/tanstack-query.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const pauseMs = Number(params.get("pause") || 60000);
const POLL_SECONDS = 5;
const money = new Intl.NumberFormat(undefined, { style: "currency", currency: "USD" });
const number = new Intl.NumberFormat();
const startedAt = Date.now();

// The service's base path: "" at the root, "/realtime" when mounted there.
const BASE = new URL(".", location.href).pathname.replace(/\/$/, "");
const rt = createClient({ url: BASE, pauseWhenHiddenAfterMs: pauseMs });
window.pgsse = rt; // for the console (and the browser tests)

// --- a minimal query cache: key → {options, render}; invalidateQueries by key prefix -----
const queries = new Map();
const queryClient = {
  invalidateQueries(filters) {
    const prefix = filters && filters.queryKey;
    for (const query of queries.values()) {
      if (!prefix || isPrefix(prefix, query.options.queryKey)) run(query);
    }
  },
};
function isPrefix(prefix, key) {
  return prefix.every((part, i) => hashKey([part]) === hashKey([key[i]]));
}
function use(name, args, render) {
  const options = aggregateQuery(rt, name, args);
  const query = { options, render, seq: 0 };
  queries.set(name, query);
  run(query);
}
async function run(query) {
  const seq = ++query.seq;
  try {
    const body = await query.options.queryFn();
    if (seq === query.seq && queries.get(query.options.queryKey[2]) === query) query.render(body);
  } catch (error) {
    console.warn(query.options.queryKey[2], error.message);
  }
  updateSavings();
}

// --- rendering -------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}
function barList(target, rows, label, value, format, attrs = () => ({})) {
  const max = Math.max(1, ...rows.map(value));
  target.replaceChildren(...(rows.length ? rows.map((row) => {
    const fill = el("div", { class: "fill" });
    fill.style.width = (100 * value(row) / max).toFixed(1) + "%";
    return el("li", attrs(row), el("span", { class: "name", title: label(row) }, label(row)),
      el("div", { class: "track" }, fill), el("span", { class: "num" }, format(value(row))));
  }) : [el("li", { class: "empty" }, "No data yet")]));
}
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}
function dailyChart(rows) {
  const days = rows.slice(-30);
  const width = 600, height = 150, pad = 18;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img" });
  const max = Math.max(1, ...days.map((d) => Number(d.revenue)));
  const step = (width - 2 * pad) / Math.max(days.length, 1);
  days.forEach((d, i) => {
    const h = (height - 2 * pad) * Number(d.revenue) / max;
    const bar = svg("rect", { class: "bar", x: pad + i * step + 2, y: height - pad - h, width: Math.max(step - 4, 2), height: h, rx: 3 });
    const title = svg("title", {});
    title.textContent = `${d.day}: ${money.format(Number(d.revenue))}, ${d.orders} orders`;
    bar.append(title);
    chart.append(bar);
  });
  if (days.length) {
    for (const [i, anchor] of [[0, "start"], [days.length - 1, "end"]]) {
      const label = svg("text", { class: "axis", x: anchor === "start" ? pad : width - pad, y: height - 4, "text-anchor": anchor });
      label.textContent = days[i].day;
      chart.append(label);
    }
  }
  $("daily-chart").replaceChildren(days.length ? chart : el("div", { class: "empty" }, "No sales yet"));
}

const renderers = {
  daily_sales(body) {
    dailyChart(body.data);
    const revenue = body.data.reduce((sum, d) => sum + Number(d.revenue), 0);
    const orders = body.data.reduce((sum, d) => sum + Number(d.orders), 0);
    $("kpi-revenue").textContent = money.format(revenue);
    $("kpi-revenue-sub").textContent = `${body.data.length} days of sales`;
    $("kpi-orders").textContent = number.format(orders);
  },
  orders_by_status(body) {
    barList($("by-status"), body.data, (r) => r.status, (r) => Number(r.orders), number.format,
      (r) => ({ dataset: { status: r.status } }));
    const pending = body.data.find((r) => r.status === "pending");
    $("kpi-pending").textContent = number.format(pending ? Number(pending.orders) : 0);
  },
  top_products(body) {
    barList($("top-products"), body.data, (r) => r.name, (r) => Number(r.revenue), (v) => money.format(v));
  },
  recent_orders(body) {
    const tbody = document.querySelector("#orders tbody");
    const before = new Set([...tbody.rows].map((row) => row.dataset.id));
    tbody.replaceChildren(...(body.data.length ? body.data.map((o) => el("tr",
      { dataset: { id: String(o.id) }, class: before.size && !before.has(String(o.id)) ? "fresh" : "" },
      el("td", {}, "#" + o.id), el("td", {}, "Product " + o.product_id), el("td", { class: "num" }, o.quantity),
      el("td", { class: "num" }, money.format(Number(o.total))), el("td", {}, el("span", { class: "pill " + o.status }, o.status)),
      el("td", { class: "muted" }, new Date(o.created_at).toLocaleString()))) : [el("tr", {}, el("td", { class: "empty", colspan: "6" }, "No orders"))]));
  },
  payout_summary(body) {
    const tbody = document.querySelector("#payouts tbody");
    tbody.replaceChildren(...(body.data.length ? body.data.map((p) => el("tr", {},
      el("td", {}, el("span", { class: "pill " + p.status }, p.status)), el("td", { class: "num" }, p.payouts),
      el("td", { class: "num" }, money.format(Number(p.amount))))) : [el("tr", {}, el("td", { class: "empty", colspan: "3" }, "No payouts yet"))]));
    const paid = body.data.find((p) => p.status === "paid");
    $("kpi-paid").textContent = money.format(paid ? Number(paid.amount) : 0);
    $("kpi-paid-sub").textContent = `${paid ? paid.payouts : 0} payouts paid`;
  },
};

// --- live events -----------------------------------------------------------------------------
let lastEventAt = 0;
let eventCount = 0;
function addEvent(e) {
  eventCount += 1;
  lastEventAt = Date.now();
  $("event-count").textContent = number.format(eventCount);
  if (e.id) $("position").textContent = e.id;
  const d = e.data || {};
  const summary = d.row ? `${d.op} #${d.row.id ?? ""}${d.row.status ? " → " + d.row.status : ""}` : JSON.stringify(d);
  const list = $("events");
  list.prepend(el("li", { dataset: { type: e.type } }, el("span", { class: "type" }, e.type),
    el("span", {}, summary), el("span", { class: "when" }, new Date().toLocaleTimeString())));
  while (list.children.length > 100) list.lastChild.remove();
}
function toast(title, text) {
  const node = el("div", { class: "toast", role: "status" }, el("strong", {}, title), text);
  $("toasts").append(node);
  setTimeout(() => node.remove(), 6000);
}

const STATUS_TEXT = { open: "Live", connecting: "Connecting…", backoff: "Reconnecting…", paused: "Paused (tab hidden)",
  offline: "Offline", unauthorized: "Not authorised", closed: "Closed", idle: "Idle" };
rt.on("status", (status, info) => {
  const badge = $("status");
  const polling = info.degraded && status !== "open";
  badge.className = "badge " + status;
  badge.dataset.state = status;
  badge.textContent = polling ? "Polling (stream unavailable)" : STATUS_TEXT[status] || status;
  badge.title = info.delayMs ? `next attempt in ${Math.round(info.delayMs / 100) / 10} s` : "";
});

// The invalidation map: named events → query keys (aggregates also refresh on their own
// `aggregate.invalidated`). payout.status.changed touches payouts only, not products.
const MAP = {
  "payout.status.changed": [aggregateKey("payout_summary")],
  "payouts.*": [aggregateKey("payout_summary")],
};

let store = 0;
let stopInvalidation = () => {};
let stopFeed = () => {};
function selectStore(id) {
  store = id;
  stopInvalidation();
  stopFeed();
  const topics = [`orders/${id}`, `payouts/${id}`];
  stopFeed = rt.subscribe(topics, (e) => {
    addEvent(e);
    if (e.type === "payout.status.changed") toast("Payout " + (e.data.status || "updated"), `Store ${id}: payout ${e.data.id ? "#" + e.data.id + " " : ""}is now ${e.data.status || "changed"}.`);
  });
  stopInvalidation = connectQueryClient(rt, queryClient, { topics, map: MAP, batchMs: 1000,
    onReset: () => toast("Back in sync", "History expired while you were away; everything was reloaded.") });
  use("daily_sales", { store_id: id }, renderers.daily_sales);
  use("orders_by_status", { store_id: id }, renderers.orders_by_status);
  use("top_products", { store_id: id }, renderers.top_products);
  use("payout_summary", { store_id: id }, renderers.payout_summary);
  loadOrders();
}
function loadOrders() {
  const status = $("order-status").value;
  const args = { store_id: store, limit: 10 };
  if (status) args.status = status;
  use("recent_orders", args, renderers.recent_orders);
  const csv = new URLSearchParams({ format: "csv", store_id: String(store) });
  if (status) csv.set("status", status);
  $("export-csv").href = BASE + "/aggregates/recent_orders?" + csv;
  $("export-csv").setAttribute("download", `orders-store-${store}${status ? "-" + status : ""}.csv`);
}

// Requests and database queries saved compared with polling each aggregate every 5 s.
function updateSavings() {
  const stats = aggregateStats(rt);
  const polls = Math.floor((Date.now() - startedAt) / 1000 / POLL_SECONDS + 1) * queries.size;
  $("saved-requests").textContent = number.format(Math.max(0, polls - stats.requests));
  $("saved-queries").textContent = number.format(Math.max(0, polls - stats.changed));
  $("made-requests").textContent = number.format(stats.requests);
}

setInterval(() => {
  $("last-event").textContent = lastEventAt
    ? `Updated ${Math.round((Date.now() - lastEventAt) / 1000)} s ago` : "waiting for the first change…";
  updateSavings();
}, 1000);

$("store").addEventListener("change", (e) => selectStore(Number(e.target.value)));
$("order-status").addEventListener("change", loadOrders);
fetch(BASE + "/readyz").then((r) => r.json()).then((body) => {
  if ((body.warnings || []).includes("auth_disabled")) $("auth-banner").hidden = false;
}).catch(() => {});
selectStore(Number($("store").value));
