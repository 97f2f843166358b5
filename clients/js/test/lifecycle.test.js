// The connection's life: state events, close() that also stops a
// connection in progress, final refusals that close the client (no silent
// reconnect loop), a tokenProvider that fails, a device taken over.
// The broker of this file allows 4 connections per user.

import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, VolnaClient, ErrorCode, CloseCode } from "../volna.js";
import { URL, Faults, token, uniqueChannel, eventually, within, metric, nextEvent } from "./helpers.js";

const fast = { backoff: { initialMs: 20, maxMs: 100 } };

function recordStates(client) {
  const states = [];
  for (const type of ["connecting", "connected", "disconnected", "closed"]) {
    client.addEventListener(type, (e) => states.push([type, e.detail]));
  }
  return states;
}

test("state events: connecting, connected, disconnected, connected again, closed", async () => {
  const faults = new Faults();
  const client = new VolnaClient(URL, { token: token("life-a"), WebSocket: faults.WebSocket, ...fast });
  const states = recordStates(client);
  assert.equal(client.state, "connecting");
  await within("connected", nextEvent(client, "connected"));
  assert.equal(client.state, "connected");
  faults.last.cut();
  await within("disconnected", nextEvent(client, "disconnected"));
  await within("connected again", nextEvent(client, "connected"));
  client.close();
  assert.equal(client.state, "closed");
  assert.deepEqual(states.map(([s]) => s), ["connecting", "connected", "disconnected", "connecting", "connected", "closed"]);
  const closed = states.at(-1)[1];
  assert.equal(closed.code, 0);
  assert.equal(closed.closeCode, CloseCode.Normal);
  assert.equal(typeof closed.reason, "string");
  await eventually("the socket to close", () => faults.sockets.every((s) => s.readyState === 3));
});

test("close() while the connection is being opened leaves no connection", async () => {
  const opened = await metric("volna_connections_opened_total");
  const faults = new Faults();
  let tokenAsked;
  const asked = new Promise((r) => { tokenAsked = r; });
  let giveToken;
  const client = new VolnaClient(URL, {
    WebSocket: faults.WebSocket, ...fast,
    // The socket is open; the token is on its way.
    tokenProvider: () => new Promise((resolve) => { tokenAsked(); giveToken = resolve; }),
  });
  const states = recordStates(client);
  await within("the token to be asked for", asked);
  client.close();
  giveToken(token("life-b"));
  await eventually("the socket to close", () => faults.sockets.every((s) => s.readyState === 3));
  assert.equal(faults.sockets.length, 1, "no new attempt after close()");
  assert.deepEqual(states.map(([s]) => s), ["connecting", "closed"]);
  await eventually("no WebSocket connection at the broker", async () => (await metric("volna_websocket_connections")) === 0);
  assert.equal(await metric("volna_connections_opened_total"), opened, "no session was opened");
  assert.equal(client.connected, false);
});

test("close() while waiting to reconnect stops reconnecting", async () => {
  const faults = new Faults();
  const client = await connect(URL, { token: token("life-c"), WebSocket: faults.WebSocket, backoff: { initialMs: 50, maxMs: 50 } });
  faults.refuse = true;
  faults.last.cut();
  await eventually("a refused attempt", () => faults.sockets.length >= 2);
  client.close();
  const made = faults.sockets.length;
  // An attempt left scheduled would come within one backoff step (50 ms).
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(faults.sockets.length, made);
  assert.equal(client.state, "closed");
});

test("a refused token closes the client: publishes and subscribes fail with the refusal", async () => {
  await assert.rejects(connect(URL, { token: "not a jwt", ...fast }), (e) => e.code === ErrorCode.Unauthorized);
  const faults = new Faults();
  const client = new VolnaClient(URL, { token: "not a jwt", WebSocket: faults.WebSocket, ...fast });
  const closed = nextEvent(client, "closed");
  const publish = client.publish(uniqueChannel(), "never");
  const subscribe = client.subscribe(uniqueChannel(), {});
  const event = await within("closed", closed);
  assert.equal(event.detail.code, ErrorCode.Unauthorized);
  await assert.rejects(publish, (e) => e.code === ErrorCode.Unauthorized);
  await assert.rejects(subscribe, (e) => e.code === ErrorCode.Unauthorized);
  assert.equal(faults.sockets.length, 1, "no reconnect loop");
  assert.equal(client.state, "closed");
  assert.equal(client.error.code, ErrorCode.Unauthorized);
});

test("a tokenProvider whose tokens are refused gets one more try, then the client closes", async () => {
  const faults = new Faults();
  let asked = 0;
  const client = new VolnaClient(URL, { WebSocket: faults.WebSocket, ...fast, tokenProvider: async () => { asked += 1; return "expired"; } });
  const event = await within("closed", nextEvent(client, "closed"));
  assert.equal(event.detail.code, ErrorCode.Unauthorized);
  assert.equal(asked, 2);
  assert.equal(faults.sockets.length, 2);
});

test("a tokenProvider that throws or hangs: an event each time, then a typed failure", async () => {
  for (const provider of [
    async () => { throw new Error("the identity server is down"); },
    () => new Promise(() => {}), // never answers
  ]) {
    const client = new VolnaClient(URL, { ...fast, tokenProvider: provider, tokenTimeoutMs: 100, maxTokenFailures: 3 });
    const failures = [];
    client.addEventListener("tokenerror", (e) => failures.push(e.detail.failures));
    const publish = client.publish(uniqueChannel(), "never");
    const event = await within("closed", nextEvent(client, "closed"));
    assert.deepEqual(failures, [1, 2, 3]);
    assert.equal(event.detail.error.kind, "token");
    await assert.rejects(publish, (e) => e.kind === "token");
  }
});

test("a connection limit refusal closes the client; its subscription ends with the code", async () => {
  const user = "life-crowded";
  const faults = new Faults();
  const client = await connect(URL, { token: token(user), WebSocket: faults.WebSocket, ...fast });
  const sub = await client.subscribe(uniqueChannel(), {});
  const ended = new Promise((resolve) => sub.addEventListener("ended", (e) => resolve(e.detail)));
  // While it is cut off, the user's other devices take every connection.
  faults.refuse = true;
  faults.last.cut();
  await within("disconnected", nextEvent(client, "disconnected"));
  const others = [];
  await eventually("the old connection to be gone at the broker", async () => (await metric("volna_connections")) === 0);
  for (let i = 0; i < 4; i++) others.push(await connect(URL, { token: token(user) }));
  const publish = client.publish(uniqueChannel(), "never");
  faults.refuse = false;
  const event = await within("closed", nextEvent(client, "closed"));
  assert.equal(event.detail.code, ErrorCode.TooManyConnections);
  assert.equal((await within("ended", ended)).code, ErrorCode.TooManyConnections);
  await assert.rejects(publish, (e) => e.code === ErrorCode.TooManyConnections);
  for (const other of others) other.close();
});

test("a connection closed as replaced (4009) is final: no reconnect", async () => {
  const faults = new Faults();
  const client = await connect(URL, { token: token("life-d"), WebSocket: faults.WebSocket, ...fast });
  const closed = nextEvent(client, "closed");
  // What the broker does when another connection of the device takes over.
  faults.last.onclose({ code: 4000 + CloseCode.Replaced, reason: "replaced by a newer connection of the same device" });
  const event = await within("closed", closed);
  assert.equal(event.detail.closeCode, CloseCode.Replaced);
  assert.equal(event.detail.error.kind, "replaced");
  assert.equal(faults.sockets.length, 1);
  await assert.rejects(client.publish(uniqueChannel(), "x"), (e) => e.kind === "replaced");
});

test("two connections of one device: the older is replaced by the broker and stays closed", async () => {
  const device = `tab-${Math.random()}`;
  const faults = new Faults();
  const older = await connect(URL, { token: token("life-e"), device, WebSocket: faults.WebSocket, ...fast });
  const closed = nextEvent(older, "closed");
  const newer = await connect(URL, { token: token("life-e"), device, ...fast });
  const event = await within("the older to be closed as replaced (needs the broker's takeover, close code 4009)", closed, 5000);
  assert.equal(event.detail.closeCode, CloseCode.Replaced);
  assert.equal(faults.sockets.length, 1, "the older does not come back");
  assert.equal(newer.state, "connected");
  newer.close();
});
