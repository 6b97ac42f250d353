// pgsse demo dashboard: one EventSource, aggregates revalidated with If-None-Match.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  let lastEventAt = 0;
  let count = 0;
  const etags = {};
  const bodies = {};

  function setStatus(state, text) {
    const el = $("status");
    el.className = "status " + state;
    el.dataset.state = state;
    el.textContent = text;
  }

  async function fetchAggregate(name, query) {
    const url = "/aggregates/" + name + (query ? "?" + query : "");
    const headers = etags[url] ? { "If-None-Match": etags[url] } : {};
    const res = await fetch(url, { headers });
    if (res.status === 304) return bodies[url];
    if (!res.ok) throw new Error(name + ": HTTP " + res.status);
    etags[url] = res.headers.get("ETag");
    bodies[url] = await res.json();
    return bodies[url];
  }

  async function refreshStatusCounts() {
    try {
      const body = await fetchAggregate("orders_by_status", "");
      if (!body) return;
      const rows = body.data.map((r) =>
        "<tr><td>" + r.status + "</td><td class=num>" + r.orders + "</td></tr>").join("");
      document.querySelector("#by-status tbody").innerHTML = rows;
      $("status-etag").textContent = "position " + body.meta.position;
    } catch (err) {
      $("status-etag").textContent = String(err.message || err);
    }
  }

  function addEvent(type, id, data) {
    count += 1;
    lastEventAt = Date.now();
    $("event-count").textContent = String(count);
    if (id) $("position").textContent = id;
    const li = document.createElement("li");
    li.className = "event";
    li.dataset.type = type;
    const summary = data && data.row ? (data.op + " " + data.topic + " #" + (data.row.id ?? "")) :
      JSON.stringify(data);
    li.innerHTML = "<span class=type></span> <span class=body></span>";
    li.querySelector(".type").textContent = type;
    li.querySelector(".body").textContent = summary;
    const list = $("events");
    list.prepend(li);
    while (list.children.length > 200) list.lastChild.remove();
  }

  function connect() {
    const es = new EventSource("/events?topic=orders&topic=payouts&topic=aggregates");
    es.onopen = () => setStatus("open", "live");
    es.onerror = () => setStatus(es.readyState === EventSource.CLOSED ? "closed" : "connecting",
      es.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…");
    const handler = (e) => {
      let data = null;
      try { data = JSON.parse(e.data); } catch (_) { data = e.data; }
      addEvent(e.type, e.lastEventId, data);
    };
    for (const t of ["orders.insert", "orders.update", "orders.delete", "payouts.insert",
                     "payouts.update", "payout.status.changed", "message"]) {
      es.addEventListener(t, handler);
    }
    es.addEventListener("aggregate.invalidated", () => refreshStatusCounts());
    es.addEventListener("reset", () => refreshStatusCounts());
  }

  setInterval(() => {
    $("last-event").textContent = lastEventAt
      ? "last event " + Math.round((Date.now() - lastEventAt) / 1000) + " s ago" : "no event yet";
  }, 1000);

  fetch("/readyz").then((r) => r.json()).then((body) => {
    if ((body.warnings || []).includes("auth_disabled")) $("auth-banner").hidden = false;
  }).catch(() => {});
  refreshStatusCounts();
  connect();
})();
