// nursery_down dashboard: keeps the server-rendered page live over server-sent events,
// and turns the action forms into in-place requests. Data only ever goes through
// textContent. The texts mirror dashboard/_view.py.
"use strict";

(() => {
  const TIMELINE_LENGTH = 100;
  const connection = document.getElementById("connection");
  const notice = document.getElementById("notice");
  const timeline = document.getElementById("timeline");
  const warnings = document.getElementById("warnings");

  let latest = null; // the last snapshot
  let receivedAt = 0; // performance.now() when it arrived
  let clockOffset = 0; // server wall clock minus ours, in seconds
  let retryDelay = 500;
  let retryTimer = null;

  // -- texts (same as _view.py) ----------------------------------------------------------

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "-";
    seconds = Math.max(0, seconds);
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    const whole = Math.floor(seconds);
    if (whole < 60) return `${whole} s`;
    if (whole < 3600) return `${Math.floor(whole / 60)} m ${whole % 60} s`;
    return `${Math.floor(whole / 3600)} h ${Math.floor((whole % 3600) / 60)} m`;
  }

  function plural(count, noun) {
    return count === 1 ? `${count} ${noun}` : `${count} ${noun}s`;
  }

  function clock(timestamp) {
    return new Date(timestamp * 1000).toLocaleTimeString([], { hour12: false });
  }

  function fmtGrace(grace) {
    return String(Number(grace.toPrecision(6)));
  }

  function inFlightSummary(inFlight, jobs, grace) {
    if (inFlight === 0) return "no jobs in flight";
    const oldest = jobs.length ? Math.max(...jobs.map((job) => job.age)) : null;
    let text = `${plural(inFlight, "job")} in flight, oldest ${duration(oldest)}`;
    const over = jobs.filter((job) => job.age >= grace).length;
    if (over) {
      const more = over === jobs.length && inFlight > jobs.length ? "+" : "";
      text += `; ${over}${more} will exceed the ${fmtGrace(grace)} s grace`;
    } else {
      text += `; grace ${fmtGrace(grace)} s`;
    }
    return text;
  }

  function serviceImpacts(service, left) {
    const summary = inFlightSummary(service.in_flight, service.jobs, service.grace);
    const n = service.in_flight;
    return {
      drain: `Stops intake now; ${summary}.`,
      start: `Starts ${service.name} again.`,
      restart: `Drains, then starts again; ${summary}.`,
      escalate: n
        ? `Hard-cancels ${plural(n, "job")} in flight now; they go back to their source.`
        : "No jobs in flight: stops at once.",
      "extend-grace": `Moves the hard-cancel deadline later; ${plural(n, "job")} in flight, ${duration(left)} left.`,
    };
  }

  function appImpacts(snapshot, jobs, left) {
    const n = snapshot.services.reduce((sum, s) => sum + s.in_flight, 0);
    const summary = inFlightSummary(n, jobs, snapshot.grace);
    return {
      drain: `Drains every service in stop order, then the process exits; ${summary}.`,
      restart: `Stops every running service in stop order, then starts them again in start order; ${summary}.`,
      escalate: n
        ? `Hard-cancels ${plural(n, "job")} in flight now; the process exits.`
        : "No jobs in flight: the process exits at once.",
      "extend-grace": `Moves every drain's hard-cancel deadline later; ${duration(left)} left.`,
      upgrade: `Runs the program again (new code) with these sockets; once it is ready, this process drains and exits; ${summary}.`,
    };
  }

  // -- rendering ----------------------------------------------------------------------------

  function setText(element, text) {
    if (element && element.textContent !== text) element.textContent = text;
  }

  function field(root, name) {
    return root.querySelector(`[data-field="${name}"]`);
  }

  function setImpacts(root, impacts) {
    for (const [name, text] of Object.entries(impacts)) {
      setText(root.querySelector(`[data-impact="${name}"]`), text);
    }
  }

  // A "Where is it waiting?" disclosure: the job's chain of awaits, fetched when opened.
  function stackDisclosure() {
    const details = document.createElement("details");
    details.className = "stack";
    const summary = document.createElement("summary");
    summary.textContent = "Where is it waiting?";
    const list = document.createElement("ol");
    list.dataset.field = "stack";
    details.append(summary, list);
    return details;
  }

  function renderJobs(card, service, elapsed) {
    const body = field(card, "jobs");
    while (body.rows.length > service.jobs.length) body.deleteRow(-1);
    while (body.rows.length < service.jobs.length) {
      const row = body.insertRow();
      for (let i = 0; i < 5; i += 1) row.insertCell();
    }
    service.jobs.forEach((job, index) => {
      const row = body.rows[index];
      const cells = row.cells;
      const info = Object.entries(job.info).map(([k, v]) => `${k}=${v}`).join(" ");
      const key = String(job.key);
      if (row.dataset.key !== key) {
        // Another job now: a chain shown for the one before would mislead.
        row.dataset.key = key;
        while (row.cells.length < 5) row.insertCell();
        row.cells[4].replaceChildren(stackDisclosure());
      }
      setText(cells[0], key);
      setText(cells[1], info);
      setText(cells[2], duration(job.age + elapsed));
      setText(cells[3], job.time_left === null ? "-" : duration(job.time_left - elapsed));
    });
    const hidden = field(card, "jobs_hidden");
    hidden.hidden = service.jobs_hidden === 0;
    setText(hidden, `${service.jobs_hidden} more hidden`);
  }

  // -- job sources: figures, and dead letters on request ------------------------------------

  function sourceSummary(source) {
    if (source.error) return `cannot read it: ${source.error}`;
    if (source.queued === null) return "not read yet";
    const parts = ["queued", "leased", "done", "dead"].map((key) => `${key} ${source[key]}`);
    if (source.rate_in !== null) parts.push(`in ${source.rate_in.toFixed(1)}/s`);
    if (source.rate_out !== null) parts.push(`out ${source.rate_out.toFixed(1)}/s`);
    return parts.join(" · ");
  }

  function renderSources(card, service) {
    for (const source of service.sources || []) {
      const element = card.querySelector(`.source[data-source="${source.index}"]`);
      if (element) setText(field(element, "source_summary"), sourceSummary(source));
    }
  }

  function deadForm(url, action, label, ids) {
    const form = document.createElement("form");
    form.className = "dead-act";
    form.method = "post";
    form.action = `${url}/${action}`;
    form.dataset.label = label;
    const input = document.createElement("input");
    input.type = "hidden";
    input.name = ids === null ? "all" : "ids";
    input.value = ids === null ? "true" : String(ids);
    const button = document.createElement("button");
    button.type = "submit";
    button.textContent = label;
    form.append(input, button);
    return form;
  }

  async function loadDead(details) {
    const holder = details.querySelector('[data-field="dead_list"]');
    const url = details.dataset.url;
    const actions = (details.dataset.actions || "").split(" ");
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || String(response.status));
      const rows = body.dead.map((job) => {
        const row = document.createElement("tr");
        for (const value of [job.id, job.preview, job.attempts, job.error, clock(job.died_at)]) {
          const cell = document.createElement("td");
          cell.textContent = String(value);
          row.append(cell);
        }
        const cell = document.createElement("td");
        if (actions.includes("requeue")) cell.append(deadForm(url, "requeue", "Requeue", job.id));
        if (actions.includes("discard")) cell.append(deadForm(url, "discard", "Discard", job.id));
        row.append(cell);
        return row;
      });
      const table = document.createElement("table");
      const head = document.createElement("tr");
      for (const name of ["Id", "Payload", "Attempts", "Last error", "Died", ""]) {
        const cell = document.createElement("th");
        cell.textContent = name;
        head.append(cell);
      }
      table.append(head, ...rows);
      const summary = document.createElement("p");
      summary.textContent = body.total > body.dead.length
        ? `${body.total} dead letters; the oldest ${body.dead.length} are listed.`
        : `${body.total} dead letters.`;
      const all = document.createElement("p");
      if (body.total && actions.includes("requeue")) all.append(deadForm(url, "requeue", "Requeue all", null));
      if (body.total && actions.includes("discard")) all.append(deadForm(url, "discard", "Discard all", null));
      holder.replaceChildren(summary, ...(body.total ? [table, all] : []));
    } catch (error) {
      const message = document.createElement("p");
      message.className = "error";
      message.textContent = `Cannot list them: ${error.message}`;
      holder.replaceChildren(message);
    }
  }

  document.addEventListener(
    "toggle",
    (toggled) => {
      const details = toggled.target;
      if (details instanceof HTMLDetailsElement && details.classList.contains("dead") && details.open) {
        loadDead(details);
      }
      if (details instanceof HTMLDetailsElement && details.classList.contains("stack") && details.open) {
        loadStack(details);
      }
    },
    true,
  );

  // -- where a job waits: its task's chain of awaits, on request -------------------------------

  async function loadStack(details) {
    const list = details.querySelector('[data-field="stack"]');
    const row = details.closest("tr");
    const card = details.closest(".service");
    if (!list || !row || !card) return;
    const query = new URLSearchParams({ service: card.dataset.service, key: row.dataset.key || row.cells[0].textContent });
    const item = (text, className) => {
      const entry = document.createElement("li");
      if (className) entry.className = className;
      entry.textContent = text;
      return entry;
    };
    list.replaceChildren(item("Loading...", null));
    try {
      const response = await fetch(`/api/jobs/stack?${query}`, {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      const body = await response.json().catch(() => null);
      if (!response.ok || !body || !Array.isArray(body.frames)) {
        list.replaceChildren(item(body && body.error ? body.error : `Cannot tell: ${response.status}`, "error"));
        return;
      }
      list.replaceChildren(
        ...body.frames.map((frame) => item(`${frame.function} at ${frame.file}:${frame.line}`, "frame")),
      );
      if (!body.frames.length) list.replaceChildren(item("Not waiting: it is running now.", null));
    } catch (error) {
      list.replaceChildren(item(`The dashboard did not answer (${error.message}).`, "error"));
    }
  }

  // -- the last drain's report -----------------------------------------------------------------

  function renderDrainReport(report) {
    const section = document.getElementById("drain-report");
    if (!section) return;
    section.hidden = !report;
    if (!report) return;
    if (section.dataset.number === String(report.number)) return;
    section.dataset.number = String(report.number);
    setText(field(section, "drain_summary"), report.summary);
    const body = field(section, "drain_jobs");
    const rows = [];
    for (const service of report.services || [report]) {
      for (const job of service.details) {
        const row = document.createElement("tr");
        for (const text of [service.service, String(job.key), job.outcome.replace("_", "-"), duration(job.after)]) {
          const cell = document.createElement("td");
          cell.textContent = text;
          row.append(cell);
        }
        rows.push(row);
      }
    }
    body.replaceChildren(...rows);
  }

  document.addEventListener("submit", async (submitted) => {
    const form = submitted.target;
    if (!(form instanceof HTMLFormElement) || !form.classList.contains("dead-act")) return;
    submitted.preventDefault();
    const details = form.closest("details.dead");
    const card = form.closest(".service");
    const what = `${form.dataset.label}: dead letters of ${card ? card.dataset.service : "a service"}`;
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      const body = await response.json().catch(() => null);
      if (response.ok) {
        const count = body ? (body.requeued ?? body.discarded) : "?";
        showNotice("ok", `${what}: ${count} done.`);
      } else {
        showNotice("error", `${what}: ${body && body.error ? body.error : response.status}`);
      }
    } catch (error) {
      showNotice("error", `${what}: the dashboard did not answer (${error.message}).`);
    }
    if (details) loadDead(details);
  });

  // -- charts: jobs per second and in flight, per service, over the last ten minutes -----

  const CHART_SECONDS = 600;
  const CHART_WIDTH = 300;
  const CHART_HEIGHT = 60;
  const SVG = "http://www.w3.org/2000/svg";
  const samples = new Map(); // service name -> [{t, completed, failed, inFlight}]

  // One sample a second at most, from the snapshots the page already receives (between
  // snapshots nothing changed, so the last one still holds).
  function sample(service, now) {
    let list = samples.get(service.name);
    if (!list) samples.set(service.name, (list = []));
    const last = list[list.length - 1];
    if (last && now - last.t < 1) return;
    list.push({ t: now, completed: service.completed, failed: service.failed, inFlight: service.in_flight });
    while (list.length && list[0].t < now - CHART_SECONDS) list.shift();
  }

  function line(points, className) {
    const path = document.createElementNS(SVG, "polyline");
    path.setAttribute("class", className);
    path.setAttribute("points", points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "));
    return path;
  }

  // In flight (area-like line), completed and failed per second; during a drain the time
  // axis runs on to the grace deadline, drawn as a dashed line.
  function renderChart(card, service, now, deadline) {
    const svg = field(card, "chart");
    if (!svg) return;
    const list = samples.get(service.name) || [];
    const end = deadline !== null && deadline > now ? deadline : now;
    // Ten minutes once there are, else the time since the page opened (a minute at least).
    const first = list.length ? list[0].t : now;
    const start = end - Math.min(CHART_SECONDS, Math.max(60, end - first));
    const x = (t) => ((t - start) / (end - start)) * CHART_WIDTH;
    const rates = [];
    for (let i = 1; i < list.length; i += 1) {
      const dt = list[i].t - list[i - 1].t;
      if (dt <= 0) continue;
      rates.push({
        t: list[i].t,
        completed: Math.max(0, list[i].completed - list[i - 1].completed) / dt,
        failed: Math.max(0, list[i].failed - list[i - 1].failed) / dt,
      });
    }
    const top = Math.max(1, ...list.map((s) => s.inFlight), ...rates.map((r) => Math.max(r.completed, r.failed)));
    const y = (value) => CHART_HEIGHT - 2 - (value / top) * (CHART_HEIGHT - 4);
    const parts = [
      line(list.map((s) => [x(s.t), y(s.inFlight)]), "in-flight"),
      line(rates.map((r) => [x(r.t), y(r.completed)]), "completed"),
      line(rates.map((r) => [x(r.t), y(r.failed)]), "failed"),
    ];
    if (deadline !== null && deadline > now) {
      const mark = document.createElementNS(SVG, "line");
      mark.setAttribute("class", "deadline");
      const at = Math.min(x(deadline), CHART_WIDTH - 1); // the right edge: keep it in view
      for (const [name, value] of [["x1", at], ["x2", at], ["y1", 0], ["y2", CHART_HEIGHT]]) {
        mark.setAttribute(name, value.toFixed(1));
      }
      parts.push(mark);
    }
    svg.replaceChildren(...parts);
    const rate = rates.length ? rates[rates.length - 1].completed : 0;
    svg.setAttribute(
      "aria-label",
      `Last ten minutes: ${service.in_flight} in flight now, ${rate.toFixed(1)} completed per second` +
        (deadline !== null && deadline > now ? `, hard-cancel in ${duration(deadline - now)}` : ""),
    );
    card.dataset.samples = String(list.length);
  }

  // The generation an upgrade replaced, while it drains and after (same as _view.py).
  function previousSummary(previous, serverNow) {
    const parts = [`pid ${previous.pid}`, previous.state];
    if (previous.asked_by) parts.push(`asked by ${previous.asked_by}`);
    if (previous.state === "running" || previous.state === "draining") {
      parts.push(`${plural(previous.in_flight, "job")} in flight`);
      if (previous.grace_deadline !== null) {
        parts.push(`hard-cancel in ${duration(previous.grace_deadline - serverNow)}`);
      }
    }
    if (previous.exit_code !== null) parts.push(`exit code ${previous.exit_code}`);
    return parts.join(" · ");
  }

  function renderPrevious(previous, elapsed, serverNow) {
    const section = document.getElementById("previous");
    section.hidden = !previous;
    if (!previous) return;
    section.dataset.state = previous.state;
    setText(field(section, "previous_state"), previous.state.toUpperCase());
    setText(field(section, "previous_summary"), previousSummary(previous, serverNow));
    const body = field(section, "previous_jobs");
    body.closest("table").hidden = previous.jobs.length === 0;
    while (body.rows.length > previous.jobs.length) body.deleteRow(-1);
    while (body.rows.length < previous.jobs.length) {
      const row = body.insertRow();
      for (let i = 0; i < 4; i += 1) row.insertCell();
    }
    previous.jobs.forEach((job, index) => {
      const cells = body.rows[index].cells;
      setText(cells[0], String(job.service));
      setText(cells[1], String(job.key));
      setText(cells[2], duration(job.age + elapsed));
      setText(cells[3], job.time_left === null ? "-" : duration(job.time_left - elapsed));
    });
    const hidden = field(section, "previous_hidden");
    hidden.hidden = previous.jobs_hidden === 0;
    setText(hidden, `${previous.jobs_hidden} more hidden`);
  }

  // Problems found at start (a grace that does not fit the outer kill deadline).
  function renderWarnings(list) {
    const texts = (list || []).map((text) => `Warning: ${text}`);
    warnings.hidden = texts.length === 0;
    const shown = Array.from(warnings.children, (item) => item.textContent.trim());
    if (shown.length === texts.length && shown.every((text, i) => text === texts[i])) return;
    warnings.replaceChildren(
      ...texts.map((text) => {
        const item = document.createElement("p");
        item.className = "error";
        item.textContent = text;
        return item;
      }),
    );
  }

  function render() {
    if (!latest) return;
    renderWarnings(latest.warnings);
    const elapsed = (performance.now() - receivedAt) / 1000;
    const serverNow = Date.now() / 1000 + clockOffset;
    const snapshot = latest;

    document.body.dataset.appState = snapshot.state;
    const appState = document.getElementById("app-state");
    appState.dataset.state = snapshot.state;
    setText(appState, snapshot.state.toUpperCase());
    // After an upgrade the page follows the new generation: another process.
    setText(document.getElementById("app-pid"), String(snapshot.pid));
    const appLeft = snapshot.grace_deadline === null ? null : snapshot.grace_deadline - serverNow;
    document.getElementById("app-grace-left").hidden = appLeft === null;
    setText(document.querySelector('[data-field="app_grace_left"]'), duration(appLeft));
    renderPrevious(snapshot.previous_generation || null, elapsed, serverNow);
    renderDrainReport(snapshot.drain_report || null);

    const allJobs = [];
    for (const service of snapshot.services) {
      const aged = service.jobs.map((job) => ({ ...job, age: job.age + elapsed }));
      allJobs.push(...aged);
      const card = document.querySelector(`.service[data-service="${CSS.escape(service.name)}"]`);
      if (!card) continue;
      card.dataset.state = service.state;
      setText(field(card, "state"), service.state.toUpperCase());
      setText(field(card, "in_flight"), String(service.in_flight));
      const oldest = service.oldest_job_age === null ? null : service.oldest_job_age + elapsed;
      setText(field(card, "oldest_job_age"), duration(oldest));
      for (const name of ["completed", "failed", "hard_cancelled", "restarts", "health"]) {
        setText(field(card, name), String(service[name]));
      }
      const reason = field(card, "health_reason");
      reason.hidden = !service.health_reason;
      setText(reason, service.health_reason || "");
      card.dataset.health = service.health;
      setText(field(card, "in_state"), duration(serverNow - service.since));
      const left = service.grace_deadline === null ? null : service.grace_deadline - serverNow;
      card.querySelector(".grace-left").hidden = left === null;
      setText(field(card, "grace_left"), duration(left));
      const error = field(card, "last_error");
      error.hidden = !service.last_error;
      setText(error, service.last_error || "");
      renderJobs(card, service, elapsed);
      renderSources(card, service);
      sample(service, serverNow);
      renderChart(card, service, serverNow, service.grace_deadline);
      setImpacts(card, serviceImpacts({ ...service, jobs: aged }, left));
    }
    setImpacts(document.getElementById("app-actions"), appImpacts(snapshot, allJobs, appLeft));
  }

  function eventText(event) {
    if (event.kind === "state" && event.service) {
      const detail = event.message === event.state ? "" : ` (${event.message})`;
      return `${event.service}: ${event.state}${detail}`;
    }
    if (event.kind === "health" && event.service) return `${event.service}: ${event.message}`;
    return event.kind === "app" ? `app: ${event.message}` : String(event.message);
  }

  function timelineItem(event) {
    const item = document.createElement("li");
    item.dataset.kind = event.kind;
    const time = document.createElement("time");
    time.textContent = clock(event.time);
    const message = document.createElement("span");
    message.textContent = eventText(event);
    item.append(time, " ", message);
    return item;
  }

  function addEvent(event) {
    timeline.prepend(timelineItem(event));
    while (timeline.children.length > TIMELINE_LENGTH) timeline.lastElementChild.remove();
    if (!latest) return;
    // State changes show at once; the counts follow in the next snapshot.
    if (event.kind === "state" && event.service) {
      const service = latest.services.find((s) => s.name === event.service);
      if (service) {
        service.state = event.state;
        service.since = event.time;
      }
    } else if (event.kind === "health" && event.service) {
      const service = latest.services.find((s) => s.name === event.service);
      if (service) {
        service.health = event.state;
        service.health_reason = event.detail ? event.detail.reason : null;
      }
    } else if (event.kind === "app" && event.state) {
      latest.state = event.state;
    }
    render();
  }

  function applySnapshot(snapshot) {
    latest = snapshot;
    receivedAt = performance.now();
    clockOffset = snapshot.server_time - Date.now() / 1000;
    if (snapshot.events) {
      timeline.replaceChildren(
        ...snapshot.events.slice(-TIMELINE_LENGTH).reverse().map(timelineItem),
      );
    }
    render();
  }

  // -- the live connection -----------------------------------------------------------------

  function setConnection(state, text) {
    connection.dataset.connection = state;
    setText(connection, text);
  }

  function connect() {
    retryTimer = null;
    const source = new EventSource("/api/events");
    // Live only while updates are read and shown: an open stream whose messages the
    // page cannot use is not live, and the page says so instead of freezing.
    const use = (apply) => (message) => {
      const previous = latest;
      try {
        apply(JSON.parse(message.data));
      } catch (error) {
        latest = previous;
        source.close();
        scheduleReconnect(`an update could not be read (${error.message})`);
        return;
      }
      if (connection.dataset.connection !== "live") {
        retryDelay = 500;
        setConnection("live", "Live");
      }
    };
    source.addEventListener("snapshot", use(applySnapshot));
    source.addEventListener("event", use(addEvent));
    source.addEventListener("error", () => {
      source.close();
      scheduleReconnect();
    });
  }

  async function scheduleReconnect(problem) {
    if (retryTimer !== null) return;
    let signedOut = false;
    try {
      const response = await fetch("/api/snapshot?max_jobs=0", { headers: { Accept: "application/json" } });
      signedOut = response.status === 401;
    } catch (error) {
      // The server is away (restarting or stopped): keep trying.
    }
    if (signedOut) {
      setConnection("offline", "Signed out: open the address with ?token= printed at start.");
      return;
    }
    const seconds = Math.round(retryDelay / 100) / 10;
    const why = problem ? `Not live: ${problem}` : "Disconnected";
    setConnection("reconnecting", `${why}; reconnecting in ${seconds} s…`);
    retryTimer = setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 10000);
  }

  // -- actions -----------------------------------------------------------------------------

  function showNotice(kind, text) {
    notice.dataset.kind = kind;
    notice.hidden = false;
    setText(notice, text);
  }

  document.addEventListener("submit", async (submitted) => {
    const form = submitted.target;
    if (!(form instanceof HTMLFormElement) || !form.classList.contains("act")) return;
    submitted.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    const card = form.closest(".service");
    const target = card ? card.dataset.service : "the whole app";
    const label = form.dataset.label;
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      const body = await response.json().catch(() => null);
      if (response.ok) {
        form.closest("details").open = false;
        showNotice("ok", `${label}: ${target}: accepted.`);
        if (body) applySnapshot(body);
      } else {
        const reason = body && body.error ? body.error : `${response.status} ${response.statusText}`;
        showNotice("error", `${label}: ${target}: ${reason}`);
      }
    } catch (error) {
      showNotice("error", `${label}: ${target}: the dashboard did not answer (${error.message}).`);
    } finally {
      button.disabled = false;
    }
  });

  setInterval(render, 1000);
  setConnection("reconnecting", "Connecting…");
  connect();
})();
