// opsapi console: live updates by polling, and wait/bake countdowns. No inline script anywhere
// (the Content-Security-Policy forbids it); no other origin is contacted.
"use strict";
(function () {
  // Server time minus this browser's, so countdowns follow the server's clock.
  let skew = 0;

  function setSkew(text) {
    const server = Date.parse(text || "");
    if (!Number.isNaN(server)) {
      skew = server - Date.now();
    }
  }

  function duration(ms) {
    let s = Math.max(0, Math.ceil(ms / 1000));
    const h = Math.floor(s / 3600);
    s -= h * 3600;
    const m = Math.floor(s / 60);
    s -= m * 60;
    return (h ? h + "h" : "") + (m ? m + "m" : "") + (s || (!h && !m) ? s + "s" : "");
  }

  function tick() {
    document.querySelectorAll("[data-ready-at]").forEach(function (el) {
      const at = Date.parse(el.dataset.readyAt);
      if (Number.isNaN(at)) {
        return;
      }
      const left = at - (Date.now() + skew);
      el.textContent = left > 0 ? duration(left) : "0s";
    });
  }

  // Someone is typing a reason or has an action open: do not pull the form from under them.
  function busy(region) {
    const active = document.activeElement;
    return region.querySelector("details[open]") !== null ||
      (active !== null && active !== document.body && region.contains(active));
  }

  function watch(region) {
    const url = region.dataset.live;
    const every = parseInt(region.dataset.interval || "3000", 10);
    const status = document.querySelector(".live-status");
    let etag = null;
    let updates = 0;

    function say(text) {
      if (status) {
        status.textContent = text;
      }
    }

    async function once() {
      if (document.visibilityState === "hidden") {
        setTimeout(once, every);
        return;
      }
      try {
        const headers = { "Accept": "text/html" };
        if (etag) {
          headers["If-None-Match"] = etag;
        }
        const response = await fetch(url, { headers: headers, credentials: "same-origin", cache: "no-store" });
        setSkew(response.headers.get("X-Console-Now"));
        if (response.status === 200) {
          const html = await response.text();
          if (!busy(region)) {
            region.innerHTML = html;
            etag = response.headers.get("ETag");
            updates += 1;
            region.dataset.updates = String(updates);
            tick();
          }
          say("live · updated " + new Date().toLocaleTimeString());
        } else if (response.status === 304) {
          say("live · checked " + new Date().toLocaleTimeString());
        } else if (response.status === 401) {
          say("signed out: reload to sign in again");
          return;
        } else {
          say("live updates failing (" + response.status + "); retrying");
        }
      } catch (error) {
        say("cannot reach the server; retrying");
      }
      setTimeout(once, every);
    }

    setTimeout(once, every);
  }

  document.addEventListener("DOMContentLoaded", function () {
    setSkew(document.body.dataset.serverNow);
    document.querySelectorAll("[data-live]").forEach(watch);
    tick();
    setInterval(tick, 1000);
  });
})();
