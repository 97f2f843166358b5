// Subscriptions that end tell the broker; what waits for its reply is
// bounded in bytes; duplicates are dropped and counted.

import { test } from "node:test";
import assert from "node:assert/strict";
import { connect } from "../volna.js";
import { URL, Faults, T, token, uniqueChannel, eventually, within, collect, metric, noSubscriptions, assertNoDuplicates } from "./helpers.js";

const fast = { backoff: { initialMs: 20, maxMs: 200 } };

test("unsubscribe() while the subscription resumes tells the broker", async () => {
  await noSubscriptions();
  const faults = new Faults();
  const ch = uniqueChannel();
  const client = await connect(URL, { token: token("uns-a"), WebSocket: faults.WebSocket, ...fast });
  const sub = await client.subscribe(ch, {});
  assert.equal(await metric("volna_subscriptions"), 1);
  // The next connection's answers are held from its resume's Subscribe on.
  let resumeSent = false;
  faults.onSend = (socket, m) => {
    if (socket !== faults.sockets[0] && m.stream === 0 && m.frames[0]?.type === T.Subscribe) {
      faults.holding = true;
      resumeSent = true;
    }
  };
  faults.sockets[0].cut();
  await eventually("the resume's Subscribe", () => resumeSent);
  assert.equal(sub.id, null, "resuming");
  await sub.unsubscribe();
  faults.release();
  const reply = await eventually("the resume's reply", () =>
    faults.received.filter((m) => m.socket !== faults.sockets[0] && m.stream === 0)
      .flatMap((m) => m.frames).find((f) => f.type === T.Subscribed));
  await eventually("an Unsubscribe for it", () => faults.sentFrames(T.Unsubscribe).some((f) => f.subscription === reply.subscription));
  await eventually("the broker to stream nothing more to it", async () => (await metric("volna_subscriptions")) === 0);
  client.close();
});

test("a subscription ended by a gap tells the broker", async () => {
  await noSubscriptions();
  const faults = new Faults();
  const ch = uniqueChannel();
  const client = await connect(URL, { token: token("uns-b"), WebSocket: faults.WebSocket, ...fast });
  const sub = await client.subscribe(ch, {});
  const id = BigInt(sub.id);
  const got = collect(sub);
  const ended = new Promise((resolve) => sub.addEventListener("ended", (e) => resolve(e.detail)));
  // The second delivery claims to start further on: a gap.
  let deliveries = 0;
  faults.onReceive = (socket, m) => {
    for (const f of m.frames) {
      if (f.type === T.Deliver && ++deliveries === 2) {
        new DataView(m.bytes.buffer, m.bytes.byteOffset).setBigUint64(f.firstAt, f.first + 5n);
      }
    }
  };
  const publisher = await connect(URL, { token: token("uns-b-pub") });
  await publisher.publish(ch, "one");
  await eventually("one", () => got.length === 1);
  await publisher.publish(ch, "two");
  const error = await within("the subscription to end", ended);
  assert.match(error.message, /gap/);
  assert.equal(sub.ended, true);
  await eventually("an Unsubscribe for it", () => faults.sentFrames(T.Unsubscribe).some((f) => f.subscription === id));
  await eventually("the broker to hold no subscription", async () => (await metric("volna_subscriptions")) === 0);
  assert.deepEqual(got, [[1, "one"]]);
  assertNoDuplicates(client, sub);
  client.close(); publisher.close();
});

test("deliveries waiting for their Subscribed reply are bounded in bytes, and none is lost", async () => {
  await noSubscriptions();
  const faults = new Faults();
  const ch = uniqueChannel();
  const publisher = await connect(URL, { token: token("uns-c-pub") });
  for (let i = 1; i <= 60; i++) await publisher.publish(ch, `m${i}`.padEnd(100, "."));
  const client = await connect(URL, { token: token("uns-c"), WebSocket: faults.WebSocket, maxBufferedBytes: 1000, ...fast });
  // The control stream is held (deliveries flow) until the client stops
  // the delivery stream it cannot route yet.
  let stopped = false;
  faults.onReceive = (socket, m) => (m.stream === 0 && !stopped ? "hold" : undefined);
  faults.onSend = (socket, m) => {
    if (m.stream !== 0 && m.bytes.length === 4 && !stopped) {
      stopped = true;
      setTimeout(() => faults.release(), 0);
    }
  };
  const sub = await within("subscribe", client.subscribe(ch, { from: 1 }));
  assert.ok(stopped, "the stream was stopped at the byte bound");
  const got = collect(sub);
  await eventually("all 60", () => got.length >= 60);
  // Exactly 1..60, each once (the stopped stream resumed from its position:
  // a delivery in flight at the stop may be dropped as seen, never shown).
  assert.deepEqual(got.map(([o]) => o), Array.from({ length: 60 }, (_, i) => i + 1));
  client.close(); publisher.close();
});

test("a delivery the broker sends twice is dropped and counted", async () => {
  const faults = new Faults();
  const ch = uniqueChannel();
  const client = await connect(URL, { token: token("uns-d"), WebSocket: faults.WebSocket, ...fast });
  const sub = await client.subscribe(ch, {});
  const got = collect(sub);
  const duplicates = [];
  sub.addEventListener("duplicate", (e) => duplicates.push(e.detail));
  faults.onReceive = (socket, m) => {
    if (m.frames.some((f) => f.type === T.Deliver)) {
      // The same Deliver frames again on the same stream, right after.
      const deliverAt = m.frames.find((f) => f.type === T.Deliver).at;
      const copy = new Uint8Array(4 + m.bytes.length - deliverAt);
      copy.set(m.bytes.subarray(0, 4));
      copy.set(m.bytes.subarray(deliverAt), 4);
      setTimeout(() => socket.inject(copy.buffer), 0);
    }
  };
  const publisher = await connect(URL, { token: token("uns-d-pub") });
  await publisher.publish(ch, "one");
  await publisher.publish(ch, "two");
  await eventually("two duplicates seen", () => client.stats.duplicatesDropped >= 2);
  await eventually("both messages", () => got.length === 2);
  assert.deepEqual(got, [[1, "one"], [2, "two"]]);
  assert.equal(client.stats.duplicatesDropped, 2);
  assert.equal(sub.duplicatesDropped, 2);
  assert.deepEqual(duplicates.map((d) => d.count), [1, 1]);
  client.close(); publisher.close();
});
