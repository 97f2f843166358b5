// Shared by the Node tests of volna.js. They run against a real broker
// started by broker/tests/js_node.rs, which passes:
//   VOLNA_WS_URL   the broker's WebSocket URL (plain ws://)
//   VOLNA_HTTP     host:port of its HTTP port (metrics)
//   VOLNA_SECRET   the HS256 secret its JWTs are signed with
//   VOLNA_CONTROL  http://host:port of the test's control endpoint
//                  (POST /stop, /start: the broker on the same ports)
// Faults are injected by `Faults`, a WebSocket wrapper handed to the
// client (`options.WebSocket`): it sees every message both ways and can
// hold, drop, change or answer them, refuse connections, or cut one.

import { createHmac } from "node:crypto";
import assert from "node:assert/strict";

export const URL = required("VOLNA_WS_URL");
export const HTTP = required("VOLNA_HTTP");
const SECRET = required("VOLNA_SECRET");
const CONTROL = process.env.VOLNA_CONTROL ?? "";

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through broker/tests/js_node.rs`);
  return value;
}

/** How long any wait may take before the test fails. */
export const DEADLINE_MS = 20000;

/** An HS256 JWT for `sub`, valid for an hour (plus `claims`). */
export function token(sub, claims = {}) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const grants = { subscribe: ["chat.>"], publish: ["chat.>"] };
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + 3600, ...grants, ...claims })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

/** A channel name no other test uses. */
let channels = 0;
export function uniqueChannel(prefix = "chat") {
  channels += 1;
  return `${prefix}.t${process.pid}.${channels}.${Math.floor(Math.random() * 1e9)}`;
}

/** Waits until `condition()` (maybe async) is truthy; fails after the deadline. */
export async function eventually(what, condition, deadlineMs = DEADLINE_MS) {
  const end = Date.now() + deadlineMs;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The promise's value; fails after the deadline. */
export async function within(what, promise, deadlineMs = DEADLINE_MS) {
  let timer;
  try {
    return await Promise.race([
      promise,
      new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), deadlineMs); }),
    ]);
  } finally { clearTimeout(timer); }
}

/** The next event `type` on `target`, as a promise. */
export function nextEvent(target, type) {
  return new Promise((resolve) => target.addEventListener(type, resolve, { once: true }));
}

/** The broker's metric `name` (a gauge or counter without labels). */
export async function metric(name) {
  const text = await (await fetch(`http://${HTTP}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(" ")[1]) : 0;
}

/** Tells the Rust test to stop or start the broker (same ports). */
export async function broker(action) {
  assert.ok(CONTROL, "VOLNA_CONTROL is not set");
  const response = await fetch(`${CONTROL}/${action}`, { method: "POST" });
  assert.equal(response.status, 200, await response.text());
}

/**
 * Asserts that no delivery was dropped as already seen, by each client
 * (`stats`) or subscription given. Where nothing resumed, a correct broker
 * sends none: a count above zero means it sent a message twice, which the
 * client's dropping would otherwise hide from every other check.
 */
export function assertNoDuplicates(...targets) {
  for (const t of targets) {
    const dropped = t.stats ? t.stats.duplicatesDropped : t.duplicatesDropped;
    assert.equal(dropped, 0, `${t.channel ?? "the client"} dropped ${dropped} deliveries as already seen`);
  }
}

/** Collects a subscription's messages as [offset, text]. */
export function collect(sub) {
  const got = [];
  sub.addEventListener("message", (e) => got.push([e.data.offset, e.data.text()]));
  return got;
}

// ---- frames -------------------------------------------------------------------

export const T = {
  Hello: 0x01, Publish: 0x02, Subscribe: 0x03, Unsubscribe: 0x04, Ping: 0x05, InitProducer: 0x0a,
  Welcome: 0x41, Published: 0x42, Subscribed: 0x43, Unsubscribed: 0x44, Error: 0x46, ProducerReady: 0x4d,
  StreamHeader: 0x81, Deliver: 0x82,
};

const text = new TextDecoder();

/**
 * The frames of one WebSocket message: {stream, frames: [{type, at, len,
 * ...fields}]} (`at`: the frame's offset in the message, its length prefix).
 */
export function parse(bytes) {
  const b = new Uint8Array(bytes);
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const stream = v.getUint32(0);
  const frames = [];
  let at = 4;
  while (at + 5 <= b.length) {
    const len = v.getUint32(at);
    const type = b[at + 4];
    const f = { type, at, len };
    const p = at + 5;
    switch (type) {
      case T.Hello: f.protocol = v.getUint16(p); break;
      case T.Publish: {
        f.requestId = v.getBigUint64(p);
        const cl = b[p + 8];
        f.channel = text.decode(b.subarray(p + 9, p + 9 + cl));
        let q = p + 9 + cl;
        f.flag = b[q]; q += 1;
        if (f.flag >= 1) { f.producer = v.getBigUint64(q); f.sequence = v.getBigUint64(q + 8); q += 16; }
        if (f.flag === 2) { f.after = v.getBigUint64(q); q += 8; }
        const n = v.getUint32(q);
        f.payload = text.decode(b.subarray(q + 4, q + 4 + n));
        break;
      }
      case T.Subscribe: {
        f.requestId = v.getBigUint64(p);
        const cl = b[p + 8];
        f.channel = text.decode(b.subarray(p + 9, p + 9 + cl));
        break;
      }
      case T.Unsubscribe: f.requestId = v.getBigUint64(p); f.subscription = v.getBigUint64(p + 8); break;
      case T.InitProducer: f.requestId = v.getBigUint64(p); f.producer = v.getBigUint64(p + 8); break;
      case T.Published: f.requestId = v.getBigUint64(p); f.offset = v.getBigUint64(p + 8); break;
      case T.Subscribed: f.requestId = v.getBigUint64(p); f.subscription = v.getBigUint64(p + 8); break;
      case T.Error: f.requestId = v.getBigUint64(p); f.code = v.getUint16(p + 8); break;
      case T.ProducerReady: f.requestId = v.getBigUint64(p); f.lastSequence = v.getBigUint64(p + 8); break;
      case T.StreamHeader: f.subscription = v.getBigUint64(p); break;
      case T.Deliver: {
        const cl = b[p];
        f.firstAt = p + 1 + cl + 8;
        f.first = v.getBigUint64(f.firstAt);
        f.count = v.getUint32(f.firstAt + 8);
        break;
      }
      default: break;
    }
    frames.push(f);
    at += 4 + len;
  }
  return { stream, frames, bytes: b };
}

/** A broker → client control message holding an Error frame. */
export function errorMessage(requestId, code, msg) {
  const m = new TextEncoder().encode(msg);
  const b = new Uint8Array(4 + 4 + 1 + 8 + 2 + 2 + m.length);
  const v = new DataView(b.buffer);
  v.setUint32(0, 0); v.setUint32(4, b.length - 8); b[8] = T.Error;
  v.setBigUint64(9, BigInt(requestId)); v.setUint16(17, code); v.setUint16(19, m.length); b.set(m, 21);
  return b.buffer;
}

// ---- fault injection ------------------------------------------------------------

/**
 * A WebSocket class for `options.WebSocket` and the knobs to break it.
 * `onSend(socket, parsed)` / `onReceive(socket, parsed)` may return
 * "drop" (or "hold" for receive: kept in order until `release()`); they
 * see every message. `refuse = true`: new sockets fail at once (a broker
 * out of reach). `sockets`: every socket made, in order.
 */
export class Faults {
  constructor() {
    this.sockets = [];
    this.sent = []; // every client → broker message, parsed
    this.received = []; // every broker → client message, parsed
    this.refuse = false;
    this.onSend = null;
    this.onReceive = null;
    this.holding = false;
    this.held = [];
    const faults = this;
    this.WebSocket = class FaultySocket {
      constructor(url, protocols) {
        faults.sockets.push(this);
        this.id = faults.sockets.length;
        this._state = 0;
        this.binaryType = "arraybuffer";
        if (faults.refuse) {
          setTimeout(() => { this._state = 3; this.onclose?.({ code: 1006, reason: "refused by the test" }); }, 0);
          return;
        }
        const real = new WebSocket(url, protocols);
        real.binaryType = "arraybuffer";
        this.real = real;
        real.onopen = (e) => this.onopen?.(e);
        real.onerror = (e) => this.onerror?.(e);
        real.onclose = (e) => { this.closeEvent = e; this.onclose?.(e); };
        real.onmessage = (e) => {
          const parsed = parse(e.data);
          parsed.socket = this;
          faults.received.push(parsed);
          const verdict = faults.onReceive?.(this, parsed);
          if (verdict === "drop") return;
          if (verdict === "hold" || faults.holding) { faults.held.push([this, e.data]); return; }
          this.onmessage?.({ data: e.data });
        };
      }
      get readyState() { return this.real ? this.real.readyState : this._state; }
      send(bytes) {
        const parsed = parse(bytes);
        parsed.socket = this;
        faults.sent.push(parsed);
        if (faults.onSend?.(this, parsed) === "drop") return;
        this.real.send(bytes);
      }
      close(code, reason) { this.closedByClient = true; this.real?.close(code, reason); }
      /** Delivers `data` to the client as if the broker sent it. */
      inject(data) { this.onmessage?.({ data }); }
      /** Cuts the connection under the client (the broker's side closes too). */
      cut() { this.real.close(1000, "cut by the test"); }
    };
  }
  /** Delivers what was held, in order, and stops holding. */
  release() {
    this.holding = false;
    for (const [socket, data] of this.held.splice(0)) {
      if (socket.real && socket.real.readyState <= 1) socket.onmessage?.({ data });
    }
  }
  /** Frames of `type` sent by the client so far. */
  sentFrames(type) { return this.sent.flatMap((m) => m.frames.filter((f) => f.type === type && m.stream === 0).map((f) => ({ ...f, socket: m.socket }))); }
  /** Frames of `type` received on the control stream so far. */
  receivedFrames(type) { return this.received.flatMap((m) => (m.stream === 0 ? m.frames.filter((f) => f.type === type) : [])); }
  /** The socket in use (the last made). */
  get last() { return this.sockets[this.sockets.length - 1]; }
}

/** Waits until the broker holds no subscription (earlier tests' clients are gone); 0. */
export async function noSubscriptions() {
  await eventually("the broker to hold no subscriptions", async () => (await metric("volna_subscriptions")) === 0);
  return 0;
}
