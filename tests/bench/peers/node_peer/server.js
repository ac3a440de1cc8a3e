// The Node peer: the watch endpoint written the way a Node service usually is.
//
//     node server.js PORT NATS_URL AUTH_FILE
//
// node:http and nats.js, one NATS subscription (`chat.*.{id}`) per watcher whose
// callback writes the frame straight to the response, `await nc.flush()` before `:ok`.
// Sessions and ownership come from the benchmark's auth file (token -> user and
// conversations). Like the asyncio peer, it gives chatwatch's numbers a reference and
// honours only what the load generator checks: 401/404, `:ok`, the frame format.
// tests/bench/run.py installs its one dependency (package-lock.json) outside the
// repository and points NODE_PATH there.
"use strict";

const fs = require("node:fs");
const http = require("node:http");

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const ROUTE_RE = /^\/api\/ai\/conversations\/([^/]+)\/watch$/;
const KEEPALIVE_MS = 15000;
// A watcher that cannot keep up is cut off rather than buffered without bound (the
// asyncio peer's 8192-frame queue, in bytes).
const MAX_BUFFERED_BYTES = 4 * 1024 * 1024;
const MAX_EARLY_FRAMES = 8192;

function fail(message, code) {
  process.stderr.write(`node_peer: ${message}\n`);
  process.exit(code);
}

function frame(subject, payload) {
  const kind = subject.split(".")[1];
  const text = Buffer.from(payload).toString("utf8");
  let data;
  let raw;
  try {
    data = JSON.parse(text);
    raw = text.replace(/[\r\n]/g, " ");
  } catch {
    data = null;
    raw = JSON.stringify(text);
  }
  let event = "chunk";
  if (kind === "message") {
    event = "message";
  } else if (data !== null && typeof data === "object" && typeof data.chunk_type === "string") {
    event = data.chunk_type;
  }
  return `data: {"event":${JSON.stringify(event)},"data":${raw}}\n\n`;
}

function tokenOf(req) {
  const header = req.headers.authorization || "";
  if (header.toLowerCase().startsWith("bearer ")) {
    return header.slice(7).trim();
  }
  for (const part of (req.headers.cookie || "").split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === "chatwatch_session") {
      return part.slice(eq + 1).trim();
    }
  }
  return null;
}

function json(res, status, body) {
  res.writeHead(status, { "Content-Type": "application/json" });
  res.end(JSON.stringify(body));
}

function makeHandler(nc, auth, watchers) {
  return async (req, res) => {
    const url = new URL(req.url, "http://peer");
    const route = ROUTE_RE.exec(url.pathname);
    if (route === null) {
      return json(res, 404, { error: "not_found" });
    }
    if (req.method !== "GET" && req.method !== "HEAD") {
      return json(res, 405, { error: "method_not_allowed" });
    }
    const token = tokenOf(req);
    const entry = token === null ? undefined : auth.get(token);
    if (entry === undefined) {
      return json(res, 401, { error: "unauthorized" });
    }
    const cid = route[1].toLowerCase();
    if (!UUID_RE.test(cid) || !entry.has(cid)) {
      return json(res, 404, { error: "not_found" });
    }
    let closed = false;
    // Frames that arrive between the SUB and its flush's PONG go out after `:ok`.
    let early = [];
    const sub = nc.subscribe(`chat.*.${cid}`, {
      callback: (err, msg) => {
        if (err !== null || closed) return;
        if (early !== null) {
          early.push(frame(msg.subject, msg.data));
          if (early.length > MAX_EARLY_FRAMES) res.destroy();
          return;
        }
        res.write(frame(msg.subject, msg.data));
        if (res.writableLength > MAX_BUFFERED_BYTES) res.destroy();
      },
    });
    const close = () => {
      if (closed) return;
      closed = true;
      watchers.delete(res);
      sub.unsubscribe();
    };
    res.on("close", close);
    try {
      await nc.flush();
    } catch {
      close();
      return res.destroy();
    }
    if (closed) return;
    res.writeHead(200, {
      "Content-Type": "text/event-stream",
      "Cache-Control": "no-cache",
      "X-Accel-Buffering": "no",
    });
    res.write(":ok\n\n" + early.join(""));
    early = null;
    watchers.add(res);
  };
}

function readAuth(path) {
  let parsed;
  try {
    parsed = JSON.parse(fs.readFileSync(path, "utf8"));
  } catch (err) {
    fail(`cannot read the auth file ${path}: ${err.message}`, 1);
  }
  const auth = new Map();
  for (const [token, entry] of Object.entries(parsed)) {
    const owned = (entry && entry.conversations) || [];
    auth.set(token, new Set(owned.map((c) => String(c).toLowerCase())));
  }
  return auth;
}

async function main(argv) {
  if (argv.length !== 3 || !/^\d+$/.test(argv[0])) {
    fail("usage: node server.js PORT NATS_URL AUTH_FILE", 2);
  }
  const [port, natsUrl, authFile] = argv;
  const auth = readAuth(authFile);
  let nats;
  try {
    nats = require("nats");
  } catch {
    fail("the `nats` package is not installed (tests/bench/run.py --peer node installs it)", 1);
  }
  let nc;
  try {
    nc = await nats.connect({ servers: natsUrl, maxReconnectAttempts: -1, name: "node-peer" });
  } catch (err) {
    fail(`cannot connect to NATS at ${natsUrl}: ${err.message}`, 1);
  }
  const watchers = new Set();
  const server = http.createServer(makeHandler(nc, auth, watchers));
  const keepalive = setInterval(() => {
    for (const res of watchers) res.write(": ping\n\n");
  }, KEEPALIVE_MS);
  server.on("error", (err) => fail(`cannot listen on 127.0.0.1:${port}: ${err.message}`, 1));
  server.listen({ port: Number(port), host: "127.0.0.1", backlog: 4096 });
  const shutdown = async () => {
    clearInterval(keepalive);
    server.close();
    server.closeAllConnections();
    await nc.drain().catch(() => {});
    process.exit(0);
  };
  process.once("SIGTERM", shutdown);
  process.once("SIGINT", shutdown);
}

main(process.argv.slice(2));
