// Across a broker restart (stopped and started again by the Rust side on
// the same ports): subscribes made meanwhile wait and resolve, resumed
// subscriptions go on without a gap, publishes are stored once.

import { test } from "node:test";
import assert from "node:assert/strict";
import { connect } from "../volna.js";
import { URL, token, uniqueChannel, eventually, within, collect, broker, nextEvent, assertNoDuplicates } from "./helpers.js";

const fast = { backoff: { initialMs: 20, maxMs: 200 }, requestTimeoutMs: 20000 };

test("a subscribe made while the broker restarts is retried and resolves; nothing is lost", async () => {
  const ch = uniqueChannel();
  const client = await connect(URL, { token: token("restart-a"), ...fast });
  const publisher = await connect(URL, { token: token("restart-a-pub"), ...fast });
  const resumed = await client.subscribe(ch, { from: 1 });
  const got = collect(resumed);
  await publisher.publish(ch, "one");
  await eventually("one", () => got.length === 1);

  const down = nextEvent(client, "disconnected");
  await broker("stop");
  await within("disconnected", down);
  let resolved = false;
  const fresh = client.subscribe(`${ch}.other`, {}).then((s) => { resolved = true; return s; });
  const stored = publisher.publish(ch, "two, sent while the broker was down");
  await eventually("a reconnect attempt", () => client.stats.reconnects >= 1 || client.state === "connecting");
  assert.equal(resolved, false);
  await broker("start");
  const sub = await within("the subscribe made while down", fresh);
  const otherGot = collect(sub);
  assert.equal((await within("the publish made while down", stored)).offset, 2);
  await publisher.publish(`${ch}.other`, "after the restart");
  await eventually("the resumed subscription's two", () => got.length === 2);
  await eventually("the new subscription's one", () => otherGot.length === 1);
  assert.deepEqual(got, [[1, "one"], [2, "two, sent while the broker was down"]]);
  assert.deepEqual(otherGot, [[1, "after the restart"]]);
  // The new subscription never resumed; the resumed one may have dropped
  // what was in flight at the stop, but delivered each message once (above).
  assertNoDuplicates(sub);
  assert.equal(client.state, "connected");
  client.close(); publisher.close();
});
