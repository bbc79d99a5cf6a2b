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
  function refresh() {
    // Not while hidden, not twice at once, and not under the operator's focus (replacing a
    // focused control would steal the keyboard).
    if (busy || document.hidden || live.contains(document.activeElement)) {
      return;
    }
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "live");
    busy = true;
    fetch(url.toString(), { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 401) {
          window.location.reload();
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined && !live.contains(document.activeElement)) {
          live.innerHTML = html;
        }
      })
      .catch(function () {})
      .then(function () {
        busy = false;
      });
  }
  window.setInterval(refresh, 2000);
})();
