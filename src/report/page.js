// Renders the job cards from the JSON above, a page at a time, with filters by
// state, provider and text. Everything is built with textContent: job ids, file
// names and provider errors are data, never markup. The filters live in the URL's
// hash (#state=failed&provider=topaz&q=...&page=2), so a view can be bookmarked.
(function () {
  "use strict";
  var PAGE = 100;
  var jobs = JSON.parse(document.getElementById("jobs-data").textContent);
  var meta = JSON.parse(document.getElementById("meta-data").textContent);
  var f = { state: "", provider: "", q: "", page: 1 };
  var $ = function (id) { return document.getElementById(id); };

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function readHash() {
    f = { state: "", provider: "", q: "", page: 1 };
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i < 0) return;
      var k = decodeURIComponent(kv.slice(0, i));
      var v = decodeURIComponent(kv.slice(i + 1).replace(/\+/g, " "));
      if (k === "page") f.page = Math.max(1, parseInt(v, 10) || 1);
      else if (k in f) f[k] = v;
    });
  }

  function writeHash() {
    var parts = [];
    ["state", "provider", "q"].forEach(function (k) {
      if (f[k]) parts.push(k + "=" + encodeURIComponent(f[k]));
    });
    if (f.page > 1) parts.push("page=" + f.page);
    try {
      history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname);
    } catch (e) { /* some file:// setups refuse; the filters still work */ }
  }

  function total(counts) {
    var n = 0;
    Object.keys(counts).forEach(function (k) { n += counts[k]; });
    return n;
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
      summary += " · previews for the first " + meta.thumbnail_jobs +
        " jobs (pixbatch report --thumbnails N for more)";
    }
    $("summary").textContent = summary;
    states.forEach(function (s) {
      var n = total(meta.counts[s]);
      var o = el("option", null, s + " (" + n + ")");
      o.value = s;
      $("f-state").appendChild(o);
      var chip = el("button", "chip st-" + s, s + " " + n);
      chip.type = "button";
      chip.setAttribute("data-state", s);
      chip.onclick = function () { f.state = f.state === s ? "" : s; f.page = 1; update(); };
      $("chips").appendChild(chip);
    });
    Object.keys(providers).sort().forEach(function (p) {
      var o = el("option", null, p + " (" + providers[p] + ")");
      o.value = p;
      $("f-provider").appendChild(o);
    });
    $("f-state").onchange = function () { f.state = this.value; f.page = 1; update(); };
    $("f-provider").onchange = function () { f.provider = this.value; f.page = 1; update(); };
    $("f-q").oninput = function () { f.q = this.value; f.page = 1; update(); };
    window.addEventListener("hashchange", function () { readHash(); render(); });
  }

  function matches(j) {
    if (f.state && j.state !== f.state) return false;
    if (f.provider && j.provider !== f.provider) return false;
    if (f.q) {
      var q = f.q.toLowerCase();
      var hay = [j.id, j.operation, j.error || "", j.origin, j.remote_id || ""];
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
    if (p.href && /^(file|https?):/.test(p.href)) {
      var a = el("a", null, p.name);
      a.href = p.href;
      cap.appendChild(a);
    } else {
      cap.textContent = p.name;
    }
    cap.title = p.name + (p.size ? " (" + p.size + ")" : "");
    fig.appendChild(box);
    fig.appendChild(cap);
    return fig;
  }

  function pictures(list, more, side, empty) {
    var div = el("div", "side " + side);
    list.forEach(function (p) { div.appendChild(picture(p, side)); });
    if (!list.length) {
      var fig = el("figure", "pic " + side + " missing");
      var box = el("div", "box");
      box.appendChild(el("div", "note", empty));
      fig.appendChild(box);
      fig.appendChild(el("figcaption", null, "\u00a0"));
      div.appendChild(fig);
    }
    if (more > 0) div.appendChild(el("div", "note", "+" + more + " more"));
    return div;
  }

  function card(j) {
    var art = el("article", "job st-" + j.state);
    art.setAttribute("data-id", j.id);
    art.setAttribute("data-state", j.state);
    art.setAttribute("data-provider", j.provider);
    var pics = el("div", "pics");
    pics.appendChild(pictures(j.inputs, j.more_inputs, "input", "no input file"));
    pics.appendChild(el("div", "arrow", "→"));
    var waiting = j.state === "done" ? "no output" : j.state === "failed" || j.state === "cancelled" ? "no output (" + j.state + ")" : "not yet (" + j.state + ")";
    pics.appendChild(pictures(j.outputs, j.more_outputs, "output", waiting));
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
    (j.metadata ? Object.keys(j.metadata) : []).forEach(function (k) { row(k, j.metadata[k]); });
    row("created", j.created);
    row("started", j.started);
    row("finished", j.finished);
    row("took", j.duration_s !== null && j.duration_s !== undefined ? j.duration_s.toFixed(1) + " s" : null);
    row("attempts", j.attempts + " failed, " + j.submissions + " submission(s)");
    row("remote id", j.remote_id);
    info.appendChild(dl);
    art.appendChild(info);
    return art;
  }

  function render() {
    $("f-state").value = f.state;
    $("f-provider").value = f.provider;
    if ($("f-q").value !== f.q) $("f-q").value = f.q;
    Array.prototype.forEach.call($("chips").children, function (c) {
      c.className = c.className.replace(/ on$/, "") + (c.getAttribute("data-state") === f.state ? " on" : "");
    });
    var shown = jobs.filter(matches);
    var pages = Math.max(1, Math.ceil(shown.length / PAGE));
    if (f.page > pages) f.page = pages;
    var from = (f.page - 1) * PAGE;
    var main = $("jobs");
    main.textContent = "";
    var frag = document.createDocumentFragment();
    shown.slice(from, from + PAGE).forEach(function (j) { frag.appendChild(card(j)); });
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
      prev.onclick = function () { f.page -= 1; update(); };
      var next = el("button", null, "next ›");
      next.type = "button";
      next.disabled = f.page >= pages;
      next.onclick = function () { f.page += 1; update(); };
      pager.appendChild(prev);
      pager.appendChild(el("span", null, "page " + f.page + "/" + pages));
      pager.appendChild(next);
    }
  }

  function update() { writeHash(); render(); window.scrollTo(0, 0); }

  readHash();
  setup();
  render();
})();
