// Renders the jobs from the JSON above as a dense grid of tiles, a page at a time,
// filtered by state, provider and text and sorted by state, provider, duration or
// error; a tile opens the job in full. Everything is built with textContent: job
// ids, file names and provider errors are data, never markup. The view lives in the
// URL's hash (#state=failed&provider=topaz&q=...&sort=error&page=2&open=ID), so it
// can be bookmarked or sent.
(function () {
  "use strict";
  var PAGE = 200;
  var jobs = JSON.parse(document.getElementById("jobs-data").textContent);
  var meta = JSON.parse(document.getElementById("meta-data").textContent);
  var KEYS = ["state", "provider", "q", "sort", "open"];
  var f;
  var $ = function (id) { return document.getElementById(id); };
  // Report order, kept for "manifest order" and as every sort's tie-break.
  jobs.forEach(function (j, i) { j._i = i; });

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function readHash() {
    f = { state: "", provider: "", q: "", sort: "", open: "", page: 1 };
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i < 0) return;
      var k = decodeURIComponent(kv.slice(0, i));
      var v = decodeURIComponent(kv.slice(i + 1).replace(/\+/g, " "));
      if (k === "page") f.page = Math.max(1, parseInt(v, 10) || 1);
      else if (KEYS.indexOf(k) >= 0) f[k] = v;
    });
  }

  function writeHash() {
    var parts = [];
    KEYS.forEach(function (k) {
      if (f[k]) parts.push(k + "=" + encodeURIComponent(f[k]));
    });
    if (f.page > 1) parts.push("page=" + f.page);
    try {
      history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname);
    } catch (e) { /* some file:// setups refuse; the view still works */ }
  }

  function total(counts) {
    var n = 0;
    Object.keys(counts).forEach(function (k) { n += counts[k]; });
    return n;
  }

  // Failures first, then what still needs attention, then work under way, then done.
  var STATE_RANK = { failed: 0, cancelled: 1, "retry-wait": 2, downloading: 3, polling: 4,
    submitted: 5, submitting: 6, preparing: 7, queued: 8, done: 9 };
  var SORTS = {
    "": ["manifest order", function () { return 0; }],
    state: ["state (failures first)", function (a, b) {
      return (STATE_RANK[a.state] || 0) - (STATE_RANK[b.state] || 0);
    }],
    provider: ["provider", function (a, b) {
      return a.provider < b.provider ? -1 : a.provider > b.provider ? 1 : 0;
    }],
    duration: ["duration (longest first)", function (a, b) {
      return (b.duration_s === null ? -1 : b.duration_s) - (a.duration_s === null ? -1 : a.duration_s);
    }],
    "duration-asc": ["duration (shortest first)", function (a, b) {
      var x = a.duration_s === null ? Infinity : a.duration_s;
      var y = b.duration_s === null ? Infinity : b.duration_s;
      return x - y;
    }],
    error: ["error (the same errors together)", function (a, b) {
      if (!a.error !== !b.error) return a.error ? -1 : 1;
      return (a.error || "") < (b.error || "") ? -1 : (a.error || "") > (b.error || "") ? 1 : 0;
    }]
  };

  function set(changes) {
    Object.keys(changes).forEach(function (k) { f[k] = changes[k]; });
    if (!("page" in changes)) f.page = 1;
    update();
  }

  function setup() {
    var states = Object.keys(meta.counts);
    var providers = {};
    states.forEach(function (s) {
      Object.keys(meta.counts[s]).forEach(function (p) {
        providers[p] = (providers[p] || 0) + meta.counts[s][p];
      });
    });
    var summary = meta.jobs + " jobs · generated " + meta.generated +
      (meta.source ? " from " + meta.source : "") +
      (meta.out_dirs.length ? " · outputs in " + meta.out_dirs.join(", ") : "");
    if (meta.thumbnail_jobs < meta.jobs) {
      summary += " · previews for the first " + meta.thumbnail_jobs + " jobs" +
        (meta.failed_previews ? " and " + meta.failed_previews + " failed ones after them" : "") +
        " (pixbatch report --thumbnails N for more)";
    }
    $("summary").textContent = summary;
    var failed = meta.counts.failed ? total(meta.counts.failed) : 0;
    if (failed) {
      // Failures in one click: the failed jobs, their errors grouped.
      var fb = el("button", "failures", "Show the " + failed + " failed");
      fb.type = "button";
      fb.id = "show-failures";
      fb.onclick = function () {
        var on = f.state === "failed";
        set({ state: on ? "" : "failed", sort: on ? "" : "error" });
      };
      $("chips").appendChild(fb);
    }
    states.forEach(function (s) {
      var n = total(meta.counts[s]);
      var o = el("option", null, s + " (" + n + ")");
      o.value = s;
      $("f-state").appendChild(o);
      var chip = el("button", "chip st-" + s, s + " " + n);
      chip.type = "button";
      chip.setAttribute("data-state", s);
      chip.onclick = function () { set({ state: f.state === s ? "" : s }); };
      $("chips").appendChild(chip);
    });
    Object.keys(providers).sort().forEach(function (p) {
      var o = el("option", null, p + " (" + providers[p] + ")");
      o.value = p;
      $("f-provider").appendChild(o);
    });
    Object.keys(SORTS).forEach(function (k) {
      var o = el("option", null, SORTS[k][0]);
      o.value = k;
      $("f-sort").appendChild(o);
    });
    $("f-state").onchange = function () { set({ state: this.value }); };
    $("f-provider").onchange = function () { set({ provider: this.value }); };
    $("f-sort").onchange = function () { set({ sort: this.value }); };
    $("f-q").oninput = function () { set({ q: this.value }); };
    $("detail").onclick = function (e) { if (e.target === this) close(); };
    document.addEventListener("keydown", function (e) { if (e.key === "Escape" && f.open) close(); });
    window.addEventListener("hashchange", function () { readHash(); render(); });
  }

  function close() { f.open = ""; writeHash(); showDetail(); }

  function matches(j) {
    if (f.state && j.state !== f.state) return false;
    if (f.provider && j.provider !== f.provider) return false;
    if (f.q) {
      var q = f.q.toLowerCase();
      var hay = [j.id, j.operation, j.error || "", j.origin, j.remote_id || "", j.prompt || ""];
      Object.keys(j.metadata || {}).forEach(function (k) { hay.push(j.metadata[k]); });
      j.inputs.concat(j.outputs).forEach(function (p) { hay.push(p.name); });
      if (hay.join("\n").toLowerCase().indexOf(q) < 0) return false;
    }
    return true;
  }

  function picture(p, side) {
    var fig = el("figure", "pic " + side);
    var box = el("div", "box");
    if (p.src && p.src.indexOf("data:image/") === 0) {
      var img = el("img");
      img.src = p.src;
      img.width = p.w;
      img.height = p.h;
      img.alt = side + " " + p.name;
      box.appendChild(img);
    } else {
      box.appendChild(el("div", "note", p.note ||
        "no preview: only the first " + meta.max_thumbnail_jobs + " jobs have previews"));
    }
    var cap = el("figcaption");
    var label = p.name + (p.size ? " · " + p.size : "");
    if (p.href && /^(file|https?):/.test(p.href)) {
      var a = el("a", null, label);
      a.href = p.href;
      cap.appendChild(a);
    } else {
      cap.textContent = label;
    }
    cap.title = p.name + (p.size ? " (" + p.size + " px)" : "");
    fig.appendChild(box);
    fig.appendChild(cap);
    return fig;
  }

  function missing(side, text) {
    var fig = el("figure", "pic " + side + " missing");
    var box = el("div", "box");
    box.appendChild(el("div", "note", text));
    fig.appendChild(box);
    fig.appendChild(el("figcaption", null, "\u00a0"));
    return fig;
  }

  function waiting(j) {
    return j.state === "done" ? "no output" : j.state === "failed" || j.state === "cancelled" ?
      "no output (" + j.state + ")" : "not yet (" + j.state + ")";
  }

  function pictures(list, more, side, empty) {
    var div = el("div", "side " + side);
    list.forEach(function (p) { div.appendChild(picture(p, side)); });
    if (!list.length) div.appendChild(missing(side, empty));
    if (more > 0) div.appendChild(el("div", "note", "+" + more + " more"));
    return div;
  }

  function took(j) {
    return j.duration_s !== null && j.duration_s !== undefined ? j.duration_s.toFixed(1) + " s" : "";
  }

  // A tile: the first input and the first output, the id, state, provider,
  // duration, the output's pixel size, and the error's first lines.
  function tile(j) {
    var art = el("article", "tile st-" + j.state);
    art.setAttribute("data-id", j.id);
    art.setAttribute("data-state", j.state);
    art.setAttribute("data-provider", j.provider);
    art.tabIndex = 0;
    art.title = j.id + (j.error ? "\n" + j.error : "");
    var pics = el("div", "pics");
    pics.appendChild(j.inputs.length ? picture(j.inputs[0], "input") : missing("input", "no input file"));
    pics.appendChild(j.outputs.length ? picture(j.outputs[0], "output") : missing("output", waiting(j)));
    art.appendChild(pics);
    art.appendChild(el("div", "t-id", j.id));
    var line = el("div", "t-line");
    line.appendChild(el("span", "badge st-" + j.state, j.state));
    line.appendChild(document.createTextNode(j.provider + " · " + j.operation));
    art.appendChild(line);
    var out = j.outputs[0];
    var bits = [took(j)];
    if (out && out.size) bits.push(out.size + " px");
    var files = j.outputs.length + j.more_outputs;
    if (files > 1) bits.push(files + " files");
    var sizes = bits.filter(Boolean).join(" · ");
    if (sizes) art.appendChild(el("div", "t-line t-size", sizes));
    if (j.error) art.appendChild(el("div", "t-err", j.error));
    var open = function () { f.open = j.id; writeHash(); showDetail(); };
    art.onclick = open;
    art.onkeydown = function (e) { if (e.key === "Enter") open(); };
    return art;
  }

  // The job in full: every preview, the error, the row, the timings.
  function card(j) {
    var art = el("article", "job st-" + j.state);
    art.setAttribute("data-id", j.id);
    var x = el("button", "close", "×");
    x.type = "button";
    x.title = "close (Esc)";
    x.onclick = close;
    art.appendChild(x);
    var pics = el("div", "pics");
    pics.appendChild(pictures(j.inputs, j.more_inputs, "input", "no input file"));
    pics.appendChild(el("div", "arrow", "→"));
    pics.appendChild(pictures(j.outputs, j.more_outputs, "output", waiting(j)));
    art.appendChild(pics);

    var info = el("div", "info");
    var h = el("h2", null, j.id);
    h.appendChild(el("span", "badge st-" + j.state, j.state));
    info.appendChild(h);
    info.appendChild(el("div", "what", j.provider + " · " + j.operation + " · " + j.origin));
    if (j.error) info.appendChild(el("div", "error", j.error));
    if (j.possible_duplicates > 0) {
      info.appendChild(el("div", "warn", j.possible_duplicates + " possible duplicate charge(s): see pixbatch show " + j.id));
    }
    var dl = el("dl");
    var row = function (k, v) {
      if (v === null || v === undefined || v === "") return;
      dl.appendChild(el("dt", null, k));
      dl.appendChild(el("dd", null, v));
    };
    row("prompt", j.prompt);
    row("params", j.params);
    Object.keys(j.metadata || {}).forEach(function (k) { row(k, j.metadata[k]); });
    row("created", j.created);
    row("started", j.started);
    row("finished", j.finished);
    row("took", took(j));
    row("attempts", j.attempts + " failed, " + j.submissions + " submission(s)");
    row("remote id", j.remote_id);
    info.appendChild(dl);
    art.appendChild(info);
    return art;
  }

  function showDetail() {
    var d = $("detail");
    d.textContent = "";
    var j = null;
    if (f.open) jobs.forEach(function (x) { if (x.id === f.open) j = x; });
    d.hidden = !j;
    if (j) d.appendChild(card(j));
  }

  function render() {
    $("f-state").value = f.state;
    $("f-provider").value = f.provider;
    $("f-sort").value = SORTS[f.sort] ? f.sort : "";
    if ($("f-q").value !== f.q) $("f-q").value = f.q;
    Array.prototype.forEach.call($("chips").children, function (c) {
      var s = c.getAttribute("data-state");
      var on = s ? s === f.state : f.state === "failed";
      c.className = c.className.replace(/ on$/, "") + (on ? " on" : "");
    });
    var shown = jobs.filter(matches);
    var by = (SORTS[f.sort] || SORTS[""])[1];
    shown.sort(function (a, b) { return by(a, b) || a._i - b._i; });
    var pages = Math.max(1, Math.ceil(shown.length / PAGE));
    if (f.page > pages) f.page = pages;
    var from = (f.page - 1) * PAGE;
    var main = $("jobs");
    main.textContent = "";
    var frag = document.createDocumentFragment();
    shown.slice(from, from + PAGE).forEach(function (j) { frag.appendChild(tile(j)); });
    main.appendChild(frag);
    if (!shown.length) main.appendChild(el("p", "empty", "No job matches the filters."));

    var pager = $("pager");
    pager.textContent = "";
    pager.appendChild(el("span", "count",
      (shown.length ? (from + 1) + "–" + Math.min(from + PAGE, shown.length) : "0") +
      " of " + shown.length + (shown.length !== jobs.length ? " (of " + jobs.length + ")" : "")));
    if (pages > 1) {
      var prev = el("button", null, "‹ prev");
      prev.type = "button";
      prev.disabled = f.page <= 1;
      prev.onclick = function () { set({ page: f.page - 1 }); };
      var next = el("button", null, "next ›");
      next.type = "button";
      next.disabled = f.page >= pages;
      next.onclick = function () { set({ page: f.page + 1 }); };
      pager.appendChild(prev);
      pager.appendChild(el("span", null, "page " + f.page + "/" + pages));
      pager.appendChild(next);
    }
    showDetail();
  }

  function update() { writeHash(); render(); window.scrollTo(0, 0); }

  readHash();
  setup();
  render();
})();
