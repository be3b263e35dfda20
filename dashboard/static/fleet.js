// nursery_down fleet page: keeps the server-rendered list of processes live by polling
// GET /api/fleet, and turns the action forms into in-place requests. Data only ever
// goes through textContent. Durations as on the main page (dashboard/_view.py).
"use strict";

(() => {
  const connection = document.getElementById("connection");
  const notice = document.getElementById("notice");
  const processes = document.getElementById("processes");
  const queues = document.getElementById("queues");
  const interval = Math.max(0.5, Number(document.body.dataset.interval) || 2) * 1000;

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "-";
    seconds = Math.max(0, seconds);
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    const whole = Math.floor(seconds);
    if (whole < 60) return `${whole} s`;
    if (whole < 3600) return `${Math.floor(whole / 60)} m ${whole % 60} s`;
    return `${Math.floor(whole / 3600)} h ${Math.floor((whole % 3600) / 60)} m`;
  }

  function element(tag, text, attributes = {}) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    return node;
  }

  function actionForm(process, action, label, service) {
    const form = element("form", null, {
      class: "act",
      method: "post",
      action: `/api/fleet/processes/${encodeURIComponent(process.id)}/${action}`,
      "data-label": label,
      "data-action": action,
    });
    if (service) form.append(element("input", null, { type: "hidden", name: "service", value: service }));
    form.append(element("button", service ? label : `${label} process`, { type: "submit" }));
    return form;
  }

  // The actions that make sense for a service in this state (as service_actions()).
  function serviceActions(state) {
    if (state === "stopped" || state === "failed") return ["start"];
    if (state === "draining") return [];
    return ["drain", "restart"];
  }

  function card(process, self) {
    const article = element("article", null, {
      class: "process",
      "data-process": process.id,
      "data-state": process.state,
    });
    const header = element("header");
    const title = element("h2", process.name);
    if (process.id === self) title.append(" ", element("small", "(this process)"));
    header.append(title, element("span", process.state.toUpperCase(), { class: "state", "data-field": "state" }));
    const stats = element("dl", null, { class: "stats" });
    const rows = [
      ["App", process.app],
      ["Version", process.version || "-"],
      ["Generation", process.generation],
      ["In flight", process.in_flight, "in_flight"],
      ["Orphans", process.orphans, "orphans"],
      ["Last report", `${duration(process.heartbeat_age)} ago`, "heartbeat"],
      ["Exit code", process.exit_code === null ? "-" : process.exit_code, "exit_code"],
    ];
    for (const [term, value, name] of rows) {
      const item = element("div");
      item.append(element("dt", term), element("dd", value, name ? { "data-field": name } : {}));
      stats.append(item);
    }
    const table = element("table", null, { class: "fleet-table" });
    const head = element("tr");
    for (const name of ["Service", "State", "In flight", "Done", "Actions"]) head.append(element("th", name, { scope: "col" }));
    table.append(element("thead"));
    table.tHead.append(head);
    const body = element("tbody", null, { "data-field": "services" });
    const live = process.state !== "stopped" && process.state !== "gone";
    for (const service of process.services) {
      const row = element("tr", null, { "data-service": service.name });
      row.append(element("td", service.name), element("td", service.state), element("td", service.in_flight), element("td", service.completed));
      const actions = element("td", null, { class: "actions" });
      if (live) {
        for (const action of serviceActions(service.state)) {
          actions.append(actionForm(process, action, action[0].toUpperCase() + action.slice(1), service.name));
        }
      }
      row.append(actions);
      body.append(row);
    }
    table.append(body);
    const actions = element("div", null, { class: "actions", "data-field": "actions" });
    if (live) {
      for (const [action, label] of [["drain", "Drain"], ["restart", "Restart"], ["escalate", "Escalate"], ["upgrade", "Upgrade"]]) {
        actions.append(actionForm(process, action, label, null));
      }
    }
    article.append(header, stats, table, actions);
    return article;
  }

  function render(fleet) {
    processes.replaceChildren(...fleet.processes.map((process) => card(process, fleet.this)));
    if (!fleet.processes.length) processes.append(element("p", "No process has reported yet."));
    queues.hidden = fleet.queues.length === 0;
    const body = queues.querySelector('[data-field="queues"]');
    body.replaceChildren(
      ...fleet.queues.map((queue) => {
        const row = element("tr");
        for (const value of [queue.name, queue.queued, queue.leased, queue.done, queue.dead, queue.reported_by]) {
          row.append(element("td", value === undefined ? "-" : value));
        }
        return row;
      }),
    );
  }

  function setConnection(state, text) {
    connection.dataset.connection = state;
    connection.textContent = text;
  }

  async function poll() {
    try {
      const response = await fetch("/api/fleet", { headers: { Accept: "application/json" }, credentials: "same-origin" });
      const body = await response.json();
      if (!response.ok) {
        setConnection("offline", `Not live: ${body.error || response.status}`);
      } else {
        render(body);
        setConnection("live", "Live");
      }
    } catch (error) {
      setConnection("reconnecting", "Not live: the dashboard did not answer; retrying…");
    }
    setTimeout(poll, interval);
  }

  function showNotice(kind, text) {
    notice.dataset.kind = kind;
    notice.hidden = false;
    notice.textContent = text;
  }

  document.addEventListener("submit", async (submitted) => {
    const form = submitted.target;
    if (!(form instanceof HTMLFormElement) || !form.classList.contains("act")) return;
    submitted.preventDefault();
    const card = form.closest(".process");
    const name = card.querySelector("h2").firstChild.textContent;
    const service = form.querySelector('input[name="service"]');
    const target = service ? `${service.value} on ${name}` : `process ${name}`;
    const label = form.dataset.label;
    const inFlight = card.querySelector('[data-field="in_flight"]').textContent;
    if (!window.confirm(`${label} ${target}? It has ${inFlight} jobs in flight.`)) return;
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      const body = await response.json().catch(() => null);
      if (response.ok) {
        showNotice("ok", `${label} ${target}: ${body ? body.result : "accepted"}`);
      } else {
        showNotice("error", `${label} ${target}: ${body && body.error ? body.error : response.status}`);
      }
    } catch (error) {
      showNotice("error", `${label} ${target}: the dashboard did not answer (${error.message}).`);
    } finally {
      button.disabled = false;
    }
  });

  setConnection("reconnecting", "Connecting…");
  poll();
})();
