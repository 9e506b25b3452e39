"""ScriptBatcher against a private redis-server: many calls, few round trips, each its own reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from enricher.script_batch import ScriptBatcher
from enricher.services import EmbeddedRedis

# Adds ARGV[1] to KEYS[1] and returns the new value; fails on a non-number.
INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as running:
        yield running


@pytest.fixture
async def client(server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(server.url)
    await redis.flushall()
    await redis.script_flush()
    yield redis
    await redis.aclose()


async def reads(client: aioredis.Redis) -> int:
    return int((await client.info("stats"))["total_reads_processed"])


async def test_concurrent_calls_share_round_trips_and_keep_order(client: aioredis.Redis) -> None:
    batcher = ScriptBatcher(client, INCR, timeout=2.0)
    await batcher.call(["warm"], ["1"])  # loads the script (NOSCRIPT, then again)
    before = await reads(client)
    replies = await asyncio.gather(*(batcher.call(["n"], ["1"]) for _ in range(200)))
    used = await reads(client) - before - 1  # this INFO's own read left out
    assert replies == list(range(1, 201))  # one atomic run each, in call order
    assert used <= 5, f"{used} round trips for 200 calls"
    await batcher.close()


async def test_each_call_gets_its_own_error(client: aioredis.Redis) -> None:
    batcher = ScriptBatcher(client, INCR, timeout=2.0)
    await client.set("text", "abc")
    good, bad = batcher.call(["n"], ["2"]), batcher.call(["text"], ["1"])
    assert await good == 2
    with pytest.raises(redis.exceptions.ResponseError):
        await bad
    await batcher.close()


async def test_a_lost_connection_fails_every_queued_call(server: EmbeddedRedis) -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    batcher = ScriptBatcher(client, INCR, timeout=2.0)
    calls = [batcher.call(["n"], ["1"]) for _ in range(3)]
    for call in calls:
        with pytest.raises((redis.exceptions.ConnectionError, OSError)):
            await call
    await batcher.close()
    await client.aclose()


async def test_close_fails_queued_calls(client: aioredis.Redis) -> None:
    batcher = ScriptBatcher(client, INCR, timeout=2.0)
    call = batcher.call(["n"], ["1"])
    await batcher.close()
    with pytest.raises(redis.exceptions.ConnectionError):
        await call


# A bulk twin of INCR: ARGV[2] = n answers n identical callers, stopping at a value over 4.
BULK_INCR = """
local n = tonumber(ARGV[2] or "")
if not n then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
local replies = {}
for i = 1, n do
  replies[i] = redis.call('INCRBY', KEYS[1], ARGV[1])
  if replies[i] > 4 then break end
end
return replies
"""


async def evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_bulk_script_answers_identical_calls_with_one_run_each_its_own_reply(
    client: aioredis.Redis,
) -> None:
    batcher = ScriptBatcher(client, BULK_INCR, timeout=2.0, bulk=True)
    await batcher.call(["warm"], ["1"])
    before = await evalsha_calls(client)
    same = [batcher.call(["n"], ["1"]) for _ in range(3)]
    other = batcher.call(["m"], ["10"])
    assert await asyncio.gather(*same, other) == [1, 2, 3, 10]
    assert await evalsha_calls(client) - before == 2  # one bulk of three, one single call
    # The script stopped at 5: the callers it did not answer share its last reply.
    assert await asyncio.gather(*(batcher.call(["n"], ["1"]) for _ in range(4))) == [4, 5, 5, 5]
    await batcher.close()


async def test_a_bulk_is_sent_again_after_the_script_was_flushed(client: aioredis.Redis) -> None:
    batcher = ScriptBatcher(client, BULK_INCR, timeout=2.0, bulk=True)
    await batcher.call(["warm"], ["1"])
    await client.script_flush()
    assert await asyncio.gather(*(batcher.call(["n"], ["2"]) for _ in range(3))) == [2, 4, 6]
    await batcher.close()


async def test_a_killed_connection_is_opened_again_and_the_batch_sent_again(
    client: aioredis.Redis,
) -> None:
    batcher = ScriptBatcher(client, INCR, timeout=2.0)
    assert await batcher.call(["n"], ["1"]) == 1
    await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert await batcher.call(["n"], ["1"]) == 2  # not an error: connected again, once
    await batcher.close()


# Answers ARGV[1], after ARGV[2] µs: a batch that times out before its reply comes.
SLOW = """
local function now() local t = redis.call('TIME') return t[1] * 1e6 + t[2] end
local deadline = now() + tonumber(ARGV[2])
while now() < deadline do end
return ARGV[1]
"""


async def test_a_timed_out_batch_never_hands_its_late_reply_to_the_next(
    client: aioredis.Redis,
) -> None:
    await client.script_load(SLOW)
    slow = ScriptBatcher(client, SLOW, timeout=0.4)
    with pytest.raises(TimeoutError):
        await slow.call([], ["first", "500000"])
    # Sent while Redis still runs the first: answered once it is done, with its own reply.
    assert await slow.call([], ["second", "0"]) == b"second"
    await slow.close()


async def test_close_hands_the_connection_back_to_the_pool(client: aioredis.Redis) -> None:
    pool = client.connection_pool
    batcher = ScriptBatcher(client, INCR, timeout=2.0)
    await batcher.call(["n"], ["1"])
    held = len(pool._in_use_connections)
    await batcher.close()
    assert held == 1
    assert len(pool._in_use_connections) == 0
