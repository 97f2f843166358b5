// The producer identity outlives the page: derived from the device (or
// given), told by the broker where its sequences stand (InitProducer,
// protocol 4), and an outbox re-sent under its sequences is stored once.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { connect, deviceProducerId, ErrorCode } from "../volna.js";
import { URL, Faults, T, token, uniqueChannel, eventually, within, collect, errorMessage, assertNoDuplicates } from "./helpers.js";

const fast = { backoff: { initialMs: 20, maxMs: 200 } };

function expectedId(device) {
  return createHash("sha256").update(`volna-producer:${device}`).digest().readBigUInt64BE(0);
}

test("the producer id: given, else derived from the device, else random", async () => {
  assert.equal(await deviceProducerId("phone-7"), expectedId("phone-7"));
  // The same value the Rust client derives (volna_client::device_producer_id).
  assert.equal(await deviceProducerId("phone-1"), 0x85dbbf70698711bcn);
  const faults = new Faults();
  const a = await connect(URL, { token: token("prod-a"), device: "phone-7", WebSocket: faults.WebSocket, ...fast });
  assert.equal(a.producerId, expectedId("phone-7"));
  assert.equal(faults.sentFrames(T.Hello)[0].protocol, 4, "Hello says protocol 4");
  a.close();
  const b = await connect(URL, { token: token("prod-a"), producerId: "18446744073709551615", ...fast });
  assert.equal(b.producerId, 18446744073709551615n);
  b.close();
  const c = await connect(URL, { token: token("prod-a"), ...fast });
  const d = await connect(URL, { token: token("prod-a"), ...fast });
  assert.notEqual(c.producerId, d.producerId);
  c.close(); d.close();
});

test("an outbox re-sent after a reload under its sequences is stored once", async () => {
  const ch = uniqueChannel();
  const device = `tab-${Math.random()}`;
  const first = await connect(URL, { token: token("prod-b"), device, ...fast });
  const stored = [];
  for (let s = 1; s <= 3; s++) stored.push(await first.publish(ch, `outbox ${s}`, { sequence: s }));
  first.close();
  // The page reloads: the same device, the same outbox, the same sequences.
  const faults = new Faults();
  const second = await connect(URL, { token: token("prod-b"), device, WebSocket: faults.WebSocket, ...fast });
  const again = [];
  for (let s = 1; s <= 3; s++) again.push(await second.publish(ch, `outbox ${s}`, { sequence: s }));
  assert.deepEqual(again.map((p) => p.offset), stored.map((p) => p.offset));
  assert.deepEqual(again.map((p) => p.duplicate), [true, true, true]);
  // The counter goes on after the highest sequence used.
  const next = await second.publish(ch, "new");
  assert.equal(next.duplicate, false);
  assert.equal(faults.sentFrames(T.Publish).at(-1).sequence, 4n);
  const reader = await connect(URL, { token: token("prod-b-read") });
  const got = collect(await reader.subscribe(ch, { from: 1 }));
  await eventually("four messages", () => got.length === 4);
  assert.deepEqual(got.map(([, t]) => t), ["outbox 1", "outbox 2", "outbox 3", "new"]);
  assertNoDuplicates(reader);
  second.close(); reader.close();
});

test("a restarted page continues after the broker's last sequence (InitProducer)", async () => {
  const ch = uniqueChannel();
  const device = `tab-${Math.random()}`;
  const first = await connect(URL, { token: token("prod-c"), device, ...fast });
  for (let i = 1; i <= 3; i++) await first.publish(ch, `run 1 #${i}`);
  first.close();
  const faults = new Faults();
  const second = await connect(URL, { token: token("prod-c"), device, WebSocket: faults.WebSocket, ...fast });
  const init = faults.sentFrames(T.InitProducer);
  assert.equal(init.length, 1, "InitProducer on the session's start (needs a broker speaking protocol 4)");
  assert.equal(init[0].producer, expectedId(device));
  assert.equal(faults.receivedFrames(T.ProducerReady)[0]?.lastSequence, 3n);
  const published = await second.publish(ch, "run 2 #1");
  assert.equal(published.duplicate, false, "not mistaken for run 1's first");
  assert.equal(faults.sentFrames(T.Publish)[0].sequence, 4n);
  // InitProducer goes before any publish on the session.
  const order = faults.sent.filter((m) => m.stream === 0).map((m) => m.frames[0].type);
  assert.ok(order.indexOf(T.InitProducer) < order.indexOf(T.Publish));
  second.close();
});

test("a broker that cannot say where the device's producer stands: a fresh random producer id", async () => {
  const faults = new Faults();
  faults.onSend = (socket, m) => {
    const f = m.frames[0];
    if (m.stream === 0 && f?.type === T.InitProducer) {
      setTimeout(() => socket.inject(errorMessage(f.requestId, ErrorCode.UnknownFrame, "unknown frame type 0x0a")), 0);
      return "drop";
    }
  };
  const device = `tab-${Math.random()}`;
  const client = await connect(URL, { token: token("prod-d"), device, WebSocket: faults.WebSocket, ...fast });
  // The device's id would resume at sequence 1, which the broker may
  // hold already (a stored message answered as a "duplicate"): not used.
  assert.notEqual(client.producerId, await deviceProducerId(device));
  const published = await within("publish", client.publish(uniqueChannel(), "hello"));
  assert.equal(published.offset, 1);
  const sent = faults.sentFrames(T.Publish)[0];
  assert.equal(sent.sequence, 1n);
  assert.equal(sent.producer, client.producerId);
  client.close();
  // An explicit producer id is the application's promise: refused instead.
  const explicit = new Faults();
  explicit.onSend = faults.onSend;
  await assert.rejects(
    connect(URL, { token: token("prod-d"), producerId: 77, WebSocket: explicit.WebSocket, ...fast, connectAttempts: 1 }),
    (e) => e.code === ErrorCode.UnknownFrame,
  );
});

test("a broker refusing protocol 4 is spoken to in protocol 3", async () => {
  const faults = new Faults();
  faults.onSend = (socket, m) => {
    const f = m.frames[0];
    if (m.stream === 0 && f?.type === T.Hello && f.protocol === 4) {
      setTimeout(() => {
        socket.inject(errorMessage(0, ErrorCode.UnsupportedVersion, "this broker speaks protocol versions 1 to 3"));
        socket.cut();
      }, 0);
      return "drop";
    }
  };
  const client = await within("connect", connect(URL, { token: token("prod-e"), WebSocket: faults.WebSocket, ...fast }));
  assert.deepEqual(faults.sentFrames(T.Hello).map((f) => f.protocol), [4, 3]);
  assert.equal(faults.sentFrames(T.InitProducer).length, 0);
  assert.equal((await client.publish(uniqueChannel(), "hi")).offset, 1);
  client.close();
});
