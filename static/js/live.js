/* A WebSocket that comes back: reconnects with exponential backoff (with jitter), asks the
 * server only for what it missed (?since=<last step seen>), and gives up on a refusal
 * (4401 not signed in, 4403 not yours) instead of hammering the server. */
(function () {
  "use strict";
  const REFUSED = { 4401: "sign in again to see live updates", 4403: "not allowed to watch this run" };

  function connectLive(path, opts) {
    const onMessage = opts.onMessage, onState = opts.onState || function () {};
    const since = opts.since || function () { return null; };
    let ws = null, attempt = 0, timer = null, stopped = false;

    function url() {
      const proto = location.protocol === "https:" ? "wss:" : "ws:";
      const s = since();
      return proto + "//" + location.host + path + (s !== null && s !== undefined ? "?since=" + s : "");
    }
    function open() {
      timer = null;
      if (stopped) return;
      ws = new WebSocket(url());
      ws.onopen = function () { attempt = 0; onState("live"); };
      ws.onmessage = function (e) {
        let msg;
        try { msg = JSON.parse(e.data); } catch (err) { return; }
        onMessage(msg);
      };
      ws.onclose = function (e) {
        ws = null;
        if (REFUSED[e.code]) { stopped = true; onState("refused", REFUSED[e.code]); return; }
        if (stopped) return;
        const delay = Math.min(30000, 500 * Math.pow(2, attempt)) * (0.5 + Math.random() / 2);
        attempt += 1;
        onState("reconnecting", Math.round(delay / 1000));
        timer = setTimeout(open, delay);
      };
    }
    function now() { // the network came back or the tab woke up: do not wait out the backoff
      if (!stopped && !ws && timer) { clearTimeout(timer); open(); }
    }
    window.addEventListener("online", now);
    document.addEventListener("visibilitychange", function () { if (!document.hidden) now(); });
    open();
    return {
      send: function (m) { if (ws && ws.readyState === 1) ws.send(JSON.stringify(m)); },
      close: function () { stopped = true; if (ws) ws.close(); },
    };
  }
  window.connectLive = connectLive;
})();
