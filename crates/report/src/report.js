"use strict";
// Everything below puts the session's text into the page through textContent only: a
// description, a diff or a log is never parsed as HTML.
(function () {
  const rows = JSON.parse(document.getElementById("data").textContent).experiments;
  const byHash = new Map(rows.map((r) => [r.hash, r]));

  function el(tag, cls, content) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (content !== undefined && content !== null) e.textContent = String(content);
    return e;
  }
  const fixed = (v, d) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));

  function diffInto(pre, diff) {
    pre.textContent = "";
    if (!diff) {
      pre.append(el("span", "muted", "(no change to the train file)"));
      return;
    }
    for (const line of diff.split("\n")) {
      let cls = "";
      if (line.startsWith("+++") || line.startsWith("---") || line.startsWith("diff ")) cls = "file";
      else if (line.startsWith("+")) cls = "add";
      else if (line.startsWith("-")) cls = "del";
      else if (line.startsWith("@@")) cls = "hunk";
      pre.append(el("span", cls, line + "\n"));
    }
  }

  // The kept chain: a diff is drawn the first time it is opened.
  for (const d of document.querySelectorAll("details[data-hash]")) {
    d.addEventListener("toggle", () => {
      const pre = d.querySelector("pre");
      if (d.open && !pre.dataset.drawn) {
        const r = byHash.get(d.dataset.hash);
        diffInto(pre, r ? r.diff : "");
        pre.dataset.drawn = "1";
      }
    });
  }

  const tbody = document.querySelector("#experiments tbody");
  const filter = document.getElementById("filter");
  const status = document.getElementById("status");
  const shown = document.getElementById("shown");
  const expanded = new Set();
  let sortKey = "i";
  let sortDir = 1;

  const value = (r, key) => {
    if (key === "runs") return r.runs.length;
    if (key === "tokens") return (r.tokens_in || 0) + (r.tokens_out || 0);
    return r[key];
  };

  function compare(a, b) {
    const x = value(a, sortKey);
    const y = value(b, sortKey);
    // Missing values sort last whichever the direction.
    if (x === null || x === undefined) return y === null || y === undefined ? a.i - b.i : 1;
    if (y === null || y === undefined) return -1;
    if (typeof x === "number") return sortDir * (x - y) || a.i - b.i;
    return sortDir * String(x).localeCompare(String(y)) || a.i - b.i;
  }

  function detailRow(r) {
    const tr = el("tr", "detail");
    const td = el("td");
    td.colSpan = 12;
    td.append(el("h4", null, r.description));
    if (r.rationale) td.append(el("p", "muted", r.rationale));
    const facts = [
      "commit " + r.hash,
      "parent " + r.parent.slice(0, 7),
      "started " + new Date(r.started * 1000).toISOString().replace("T", " ").slice(0, 16) + " UTC",
    ];
    if (r.gain_sigma !== null) facts.push("gain " + r.gain_sigma.toFixed(1) + " σ");
    td.append(el("p", "muted", facts.join(" · ")));
    if (r.runs.length) {
      td.append(el("h4", null, "runs"));
      const ul = el("ul");
      for (const run of r.runs) {
        const v = run.val_bpb === null ? "" : " " + run.val_bpb.toFixed(6);
        ul.append(el("li", null, "run " + (run.run + 1) + ", seed " + run.seed + ": " + run.outcome + v));
      }
      td.append(ul);
    }
    if (r.evidence) {
      td.append(el("h4", null, "why it failed"));
      td.append(el("pre", null, r.evidence));
    }
    td.append(el("h4", null, "replay"));
    td.append(el("code", "replay", r.replay));
    td.append(el("h4", null, "diff against its parent"));
    const pre = el("pre", "diff");
    diffInto(pre, r.diff);
    td.append(pre);
    td.append(el("h4", null, "log tail"));
    td.append(el("pre", "log", r.log_tail || "(no log)"));
    tr.append(td);
    return tr;
  }

  function render() {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    const wanted = status.value;
    const list = rows.filter((r) => {
      if (wanted && r.status !== wanted) return false;
      if (!words.length) return true;
      // A hash matches from its start, by 4 characters or more: "c7" finds no hash.
      const hay = (r.description + " " + r.outcome + " " + r.status).toLowerCase();
      return words.every((w) => hay.includes(w) || (w.length >= 4 && r.hash.startsWith(w)));
    });
    list.sort(compare);
    const frag = document.createDocumentFragment();
    for (const r of list) {
      const tr = el("tr", "row " + r.status);
      tr.dataset.hash = r.hash;
      const tokens = r.tokens_in === null && r.tokens_out === null ? "–" : (r.tokens_in || 0) + " / " + (r.tokens_out || 0);
      const cells = [
        [r.i, "num"],
        [r.hash.slice(0, 7), ""],
        [r.status, ""],
        [r.outcome, ""],
        [fixed(r.val_bpb, 6), "num"],
        [r.runs.length, "num"],
        [fixed(r.build_s, 1), "num"],
        [fixed(r.run_s, 1), "num"],
        [tokens, "num"],
        [r.cost_usd === null ? "–" : "$" + r.cost_usd.toFixed(3), "num"],
        [fixed(r.memory_gb, 1), "num"],
        [r.description, ""],
      ];
      for (const [v, cls] of cells) tr.append(el("td", cls, v));
      tr.addEventListener("click", () => {
        if (expanded.has(r.hash)) expanded.delete(r.hash);
        else expanded.add(r.hash);
        render();
      });
      frag.append(tr);
      if (expanded.has(r.hash)) frag.append(detailRow(r));
    }
    tbody.replaceChildren(frag);
    shown.textContent = list.length + " of " + rows.length + " shown";
  }

  for (const th of document.querySelectorAll("#experiments th")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      sortDir = key === sortKey ? -sortDir : 1;
      sortKey = key;
      for (const h of document.querySelectorAll("#experiments th")) h.classList.remove("asc", "desc");
      th.classList.add(sortDir > 0 ? "asc" : "desc");
      render();
    });
  }
  filter.addEventListener("input", render);
  status.addEventListener("change", render);
  render();
  document.body.dataset.ready = "1";
})();
