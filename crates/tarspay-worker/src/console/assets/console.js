// The operator console's only script (no inline script: the Content-Security-Policy forbids
// it). Two jobs: ask before an action form is sent, and refresh a page's live region every
// 2 s from `?fragment=live`. Without it every page still works, minus the refresh.
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  var live = document.querySelector("[data-live]");
  if (!live) {
    return;
  }
  var busy = false;
  var shown = live.innerHTML;

  // Text the operator selected inside the region (replacing it would drop the selection).
  function selecting() {
    var selection = window.getSelection && window.getSelection();
    return !!(selection && !selection.isCollapsed && selection.rangeCount > 0 &&
      live.contains(selection.getRangeAt(0).commonAncestorContainer));
  }

  // Says, once, that what is shown is no longer current (the server did not answer).
  function stale(isStale) {
    var note = document.getElementById("live-stale");
    if (!isStale) {
      live.removeAttribute("data-stale");
      if (note) { note.remove(); }
      return;
    }
    live.setAttribute("data-stale", "true");
    if (!note) {
      note = document.createElement("p");
      note.id = "live-stale";
      note.className = "error";
      note.setAttribute("role", "status");
      note.textContent = "Not refreshed since " + new Date().toLocaleTimeString() +
        ": the console did not answer. What is shown may be out of date.";
      live.parentNode.insertBefore(note, live);
    }
  }

  function swap(html) {
    if (html === shown) {
      return;
    }
    // Keep each wide table where the operator scrolled it (phones scroll them sideways).
    var scrolled = Array.prototype.map.call(live.querySelectorAll(".table-wrap"), function (w) {
      return w.scrollLeft;
    });
    live.innerHTML = html;
    shown = html;
    Array.prototype.forEach.call(live.querySelectorAll(".table-wrap"), function (w, i) {
      if (scrolled[i]) { w.scrollLeft = scrolled[i]; }
    });
  }

  function refresh() {
    // Not while hidden, not twice at once, and not under the operator's focus or selection
    // (replacing a focused control would steal the keyboard).
    if (busy || document.hidden || live.contains(document.activeElement) || selecting()) {
      return;
    }
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "live");
    busy = true;
    // A request that hangs is given up, so the refresh never stops for good.
    var abort = window.AbortController ? new AbortController() : null;
    var timer = abort ? window.setTimeout(function () { abort.abort(); }, 8000) : null;
    fetch(url.toString(), {
      credentials: "same-origin",
      cache: "no-store",
      signal: abort ? abort.signal : undefined
    })
      .then(function (response) {
        if (response.status === 401) {
          window.location.reload();
          return null;
        }
        if (!response.ok) {
          throw new Error("status " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        if (html === null) {
          return;
        }
        stale(false);
        if (!live.contains(document.activeElement) && !selecting()) {
          swap(html);
        }
      })
      .catch(function () {
        stale(true);
      })
      .then(function () {
        if (timer) { window.clearTimeout(timer); }
        busy = false;
      });
  }
  window.setInterval(refresh, 2000);
})();
