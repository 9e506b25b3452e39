-- acquire.lua: one atomic decision "may one call to this API start, and when?" (GCRA reservation
-- at the effective rate, which the server's own budget may lower, plus UTC calendar quotas, and for
-- a replay its own lane; a shadow limit is measured, never enforced). Units: times are integer µs
-- since the Unix epoch taken from Redis TIME (never the client's clock); rates are calls per
-- second; max_wait is microseconds.
--
-- KEYS[1]  <prefix>tat        theoretical arrival time of the next call (GCRA), string of µs
-- KEYS[2]  <prefix>blocked    the API's "blocked until" (server Retry-After, see block.lua), µs
-- KEYS[3]  <prefix>overrides  hash of run-time overrides: rate (calls/s), burst, quota:<period>,
--          shadow_rate (calls/s), shadow_burst
-- KEYS[4]  <prefix>quota:     prefix of the quota counters; the script appends "<period>:<stamp>"
--          (e.g. "day:2025-01-31", and ":base" to that for its base) because the period
--          depends on Redis time, or "epoch" (see "Recovery from lost state"). <prefix> is
--          "enricher:{<app_id>:<api>}:", so every key shares the {<app_id>:<api>} hash tag and
--          Redis Cluster routes them all to one slot.
-- KEYS[5]  <prefix>server_budget  hash: limit, reset_at (server_budget.lua), if the API said one
-- KEYS[6]  <prefix>granted        grant counter: every granted call gets the next number
-- KEYS[7]  <prefix>shadow:        prefix of the shadow bucket's keys; the script appends "tat"
--          (its GCRA TAT, µs), "delayed" and "calls" (counters). KEYS[5..7] may be left out
--          (then no server budget, no grant numbers, no shadow), but not when KEYS[8..9] are.
-- KEYS[8]  <prefix>replay:<id>:tat  (replay calls only) the replay's own GCRA TAT, µs
-- KEYS[9]  <prefix>replay:<id>:     (replay calls only) prefix of the replay's per-period keys;
--          the script appends "cap:<period>:<stamp>" (units the replay may use in that period)
--          and "used:<period>:<stamp>" (units it used).
-- ARGV[1]  rate (calls/s, > 0)   ARGV[2] burst (calls, >= 1)   ARGV[3] max_wait (µs)
-- ARGV[4..7]  quota limits for minute, hour, day, month (-1 = no such quota)
-- ARGV[8]  optional fake "now" in µs, for tests only; empty = Redis TIME
-- ARGV[9]  replay share in (0, 1]; absent or empty = a live call (KEYS[8..9] are then unused)
-- ARGV[10] the caller's sight: the `sight` of the last reply it got ("" = none yet); absent =
--          no recovery from lost state (scripted tests only; every worker passes it)
-- ARGV[11] optional n: a bulk of n decisions for n callers with these same arguments; the reply
--          is then a list of up to n replies (see "Bulk" at the end)
--
-- Returns {granted, wait_us, reason, rem_minute, rem_hour, rem_day, rem_month, rate, number,
-- sight}:
--   granted 1: a slot is reserved, the caller sleeps wait_us and then calls (pacing by reservation);
--   granted 0: nothing reserved or counted; reason is "blocked", "server" (the server's budget is spent),
--              "quota:<period>", "replay-quota:<period>", "rate" or "replay-rate", and wait_us is
--              how long until asking again can succeed.
--   rem_*: the API's (shared) quota left in the current period after this decision (-1 = none);
--   rate: the effective rate (calls/s, as a string) so a worker can fall back to it locally;
--   number: the grant's number (KEYS[6]), which the caller hands back with the answer's
--           rate-limit figures (server_budget.lua); -1 when refused or without KEYS[6];
--   sight: "<epoch> <grants> <period>=<stamp>=<used> ..." (the epoch, the grant counter and each
--          quota's counter after this decision), which the caller hands back as its next ARGV[10]
--          ("" without ARGV[10]).
-- Every key written gets a TTL: a crash can never leave an immortal key.
--
-- Effective rate. The config's rate and burst, unless overridden (HSET by `limits set`). Then the
-- server's budget (KEYS[5], from its own rate-limit headers, see server_budget.lua): the grants
-- numbered up to `limit` may be made before `reset_at`. With left = limit - grants so far, a call
-- is refused ("server") while left <= 0 until the reset, and the bucket runs at the server's pace
-- left / (reset_at - now) when that is slower than the rate, with a burst of 1: what the server
-- has left is spread evenly over every worker, so the fleet slows down before it is answered 429.
-- Counting grants (reserved slots and calls in flight included) rather than trusting a stored
-- pace is what makes this hold while answers lag behind the calls. The reply's rate is the paced
-- one.
--
-- Recovery from lost state (Redis restarted empty, flushed, or rolled back to an older snapshot
-- or a lagging replica). The key <KEYS[4]>epoch (TTL 7 days, renewed by every decision) names
-- the current epoch (the Redis time at its start, µs). An epoch starts when that key is missing,
-- or when the caller's sight shows a state Redis no longer has (its epoch is newer than the
-- stored one, or the same with more grants than the counter holds). State may have been lost
-- then (or this is the API's first call in 7 days), and the script fails closed:
--   * the bucket: every slot granted before the loss lies at most max_wait (ARGV[3]) after the
--     loss, so the old bucket's TAT was at most loss + max_wait + burst x interval; the TAT is
--     raised to now + that, and new grants continue the old bucket as if it had never been lost.
--     Cost: no call for about max_wait + burst / rate (1.2 s at 50/s, burst 10, max_wait 1 s)
--     once per epoch, also at an API's first start.
--   * the counters: each quota counter of the current periods keeps a base (<key>:base, same
--     TTL), the value it had when the epoch started (0 after a wipe). A sight from an earlier
--     epoch is a lower bound of the counters before the loss: where its period stamp is current
--     and its count exceeds the base, the difference is added to the counter and the base
--     raised to it; so a counter becomes max(base, every worker's last count) + the grants made
--     since the loss, never counting a grant twice. The grant counter (KEYS[6]) is raised to the
--     sight's the same way, so grant numbers keep growing (server_budget.lua, and the rollback
--     check above).
-- What stays lost: calls granted between the last reply any live worker got and the loss (a
-- worker that restarted since has no sight), the run-time overrides (the config applies again;
-- if an override had made the bucket slower, its burst / rate bound the old TAT, not the
-- config's), the server's budget (learnt again from the next answer), Retry-After blocks (each
-- worker still obeys those it stored itself) and a replay's own bucket, cap and use (its calls
-- still count in the shared bucket and quotas).
--
-- Shadow limit (overrides shadow_rate, shadow_burst; `limits set --shadow-rate`). Evaluated at
-- every granted call (live and replay: a limit would apply to both), never enforced: nothing
-- above depends on it. It is a GCRA policer at the moment the call goes (its slot): the call
-- conforms if the shadow bucket has room then (shadow wait 0), and only then advances the
-- shadow TAT; otherwise the shadow limit would have delayed it, and "delayed" is incremented.
-- So "delayed" counts the calls that went over the shadow limit, i.e. that it would have held
-- back (not the knock-on delays of a queue that would have built up behind them). "calls"
-- counts every call evaluated. Both counters live as long as the overrides hash.
--
-- Replay lane. A replay call must pass everything a live call passes (block, the shared quotas,
-- the shared bucket) and counts against the shared bucket and quota counters like a live call.
-- On top of that:
--   * its own GCRA bucket: rate x share, burst max(1, floor(burst x share)), of the effective
--     (overridden) rate and burst. The call's slot is the later of the two buckets' allow times,
--     and both TATs advance from that slot (max(tat, slot) + interval), so each bucket sees the
--     call exactly where it happens and neither is ever exceeded (the GCRA bound "at most
--     burst + rate x w calls in any window w" only needs each TAT to grow by >= one interval per
--     call and never lag the slot it granted, whatever the order of the decisions);
--   * the replay's slot may not lie past the shared TAT (max(now, tat)); if its own bucket's
--     slot does, the call is refused ("replay-rate", wait = how far past it lies). One TAT
--     cannot hold holes: a replay slot reserved beyond it would push the shared TAT there and
--     waste every shared slot in between (measured: live got 12/s of 40/s against a 10/s
--     replay). Within the shared TAT, max(tat, slot) = max(tat, now), so a replay call advances
--     the shared bucket by exactly one interval, like a live call: nothing is wasted. So a
--     replay reserves ahead on the shared queue (up to max_wait) but on its own bucket only
--     within the shared TAT; past that its waiters come back after the hinted wait (a lower
--     bound: sooner if live calls move the shared TAT), spread by the client (LimiterBase);
--   * per quota period, a cap: floor(share x remaining) taken at the replay's first granted call
--     in that period and kept (SET NX) for the rest of it; once the replay used its cap it is
--     refused with "replay-quota:<period>" until the period ends, leaving the rest to live calls.
-- Why live traffic keeps the rest: every replay call takes one slot of the shared bucket, exactly
-- as a live call does, and its own bucket grants it at most share x rate (+ its small burst) in
-- any window; so when both lanes saturate, of the shared bucket's rate x w slots at most
-- share x rate x w go to the replay and at least (1 - share) x rate x w to live calls. Likewise a
-- replay's quota use is capped at share x what was left at its start, so live calls keep at
-- least (1 - share) of it.

local PERIODS = {"minute", "hour", "day", "month"}
local EPOCH_TTL_MS = 7 * 86400000    -- the epoch marker outlives any reservation by far
local GRANTED_TTL_MS = 32 * 86400000 -- the grant counter outlives any server budget
local floor = math.floor

-- Days since 1970-01-01 -> proleptic Gregorian y, m, d (H. Hinnant's civil_from_days).
local function civil_from_days(z)
  z = z + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local d = doy - floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- y, m, d -> days since 1970-01-01 (H. Hinnant's days_from_civil).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- The UTC calendar period holding `secs`: start and end (seconds) and the key stamp.
local function period_of(name, secs)
  local days = floor(secs / 86400)
  local y, m, d = civil_from_days(days)
  local sod = secs - days * 86400
  local hh, mm = floor(sod / 3600), floor((sod % 3600) / 60)
  if name == "minute" then
    local start = secs - secs % 60
    return start, start + 60, string.format("%04d-%02d-%02dT%02d:%02d", y, m, d, hh, mm)
  elseif name == "hour" then
    local start = secs - secs % 3600
    return start, start + 3600, string.format("%04d-%02d-%02dT%02d", y, m, d, hh)
  elseif name == "day" then
    return days * 86400, days * 86400 + 86400, string.format("%04d-%02d-%02d", y, m, d)
  end
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return days_from_civil(y, m, 1) * 86400, days_from_civil(ny, nm, 1) * 86400,
    string.format("%04d-%02d", y, m)
end

-- One decision; `sight_arg` is the caller's sight (ARGV[10], or in a bulk the previous reply's).
local function decide(sight_arg)
  local now
  if ARGV[8] and ARGV[8] ~= "" then
    now = tonumber(ARGV[8])
  else
    local t = redis.call("TIME")
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end

  local share
  if ARGV[9] and ARGV[9] ~= "" then
    share = tonumber(ARGV[9])
    if not (share and share > 0 and share <= 1) then
      return redis.error_reply("replay share must be in (0, 1], got " .. ARGV[9])
    end
    if not KEYS[9] then return redis.error_reply("a replay call needs KEYS[1] to KEYS[9]") end
  end

  -- Effective limits: run-time overrides (HSET by `enricher limits set`) win over the config.
  local ov = {}
  local flat = redis.call("HGETALL", KEYS[3])
  for i = 1, #flat, 2 do ov[flat[i]] = tonumber(flat[i + 1]) end
  local rate = ov["rate"] or tonumber(ARGV[1])
  local burst = ov["burst"] or tonumber(ARGV[2])
  if not (rate > 0) then rate = tonumber(ARGV[1]) end
  if not (burst >= 1) then burst = tonumber(ARGV[2]) end
  local max_wait = tonumber(ARGV[3])

  -- The server's budget: calls it has left, and until when (see the header).
  local server_left, server_reset
  if KEYS[6] then
    local budget = redis.call("HMGET", KEYS[5], "limit", "reset_at")
    local limit, reset_at = tonumber(budget[1]), tonumber(budget[2])
    if limit and reset_at and reset_at > now then
      server_left = limit - tonumber(redis.call("GET", KEYS[6]) or "0")
      server_reset = reset_at
      local pace = server_left * 1000000 / (reset_at - now)
      if server_left > 0 and pace < rate then rate, burst = pace, 1 end
    end
  end

  -- Quotas: limit, key and period of each period that has one.
  local secs = floor(now / 1000000)
  local quotas, remaining = {}, {}
  for i, name in ipairs(PERIODS) do
    local limit = ov["quota:" .. name] or tonumber(ARGV[3 + i])
    remaining[i] = -1
    if limit >= 0 then
      local _, stop, stamp = period_of(name, secs)
      local key = KEYS[4] .. name .. ":" .. stamp
      quotas[#quotas + 1] = {i = i, name = name, key = key, stamp = stamp, limit = limit, stop = stop,
        ttl = math.ceil((stop * 1000000 - now) / 1000) + 60000, base_key = key .. ":base",
        used = tonumber(redis.call("GET", key) or "0")}
    end
  end

  -- (0) Recovery from lost state (see the header), when the caller reports its sight (sight_arg).
  local epoch, granted_count = "", 0
  if sight_arg then
    local words, seen = {}, {}
    for word in string.gmatch(sight_arg, "%S+") do words[#words + 1] = word end
    local seen_epoch, seen_granted = tonumber(words[1] or ""), tonumber(words[2] or "") or 0
    for i = 3, #words do
      local name, stamp, used = string.match(words[i], "^(%a+)=([^=]+)=(%d+)$")
      if name then seen[name] = {stamp = stamp, used = tonumber(used)} end
    end
    local epoch_key = KEYS[4] .. "epoch"
    local stored = tonumber(redis.call("GET", epoch_key) or "")
    if KEYS[6] then granted_count = tonumber(redis.call("GET", KEYS[6]) or "0") end
    local lost = not stored or (seen_epoch ~= nil and (seen_epoch > stored
      or (seen_epoch == stored and seen_granted > granted_count)))
    if lost then
      -- A new epoch: the counters as they are now are its base, and the bucket starts past every
      -- slot reserved before the loss (max_wait ahead at most) plus a full bucket's worth.
      stored = math.max(now, (seen_epoch or 0) + 1)
      for _, q in ipairs(quotas) do
        redis.call("SET", q.base_key, string.format("%.0f", q.used), "PX", q.ttl)
      end
      local after = now + max_wait + burst * math.ceil(1000000 / rate)
      if tonumber(redis.call("GET", KEYS[1]) or "0") < after then
        redis.call("SET", KEYS[1], string.format("%.0f", after), "PX",
          math.ceil((after - now) / 1000) + 1000)
      end
    end
    epoch = string.format("%.0f", stored)
    redis.call("SET", epoch_key, epoch, "PX", EPOCH_TTL_MS)
    if seen_epoch ~= nil and seen_epoch ~= stored then
      -- A sight from an earlier epoch: lower bounds of the counters before the loss.
      if KEYS[6] and seen_granted > granted_count then
        granted_count = seen_granted
        redis.call("SET", KEYS[6], string.format("%.0f", granted_count), "PX", GRANTED_TTL_MS)
      end
      for _, q in ipairs(quotas) do
        local sight = seen[q.name]
        local base = tonumber(redis.call("GET", q.base_key) or "")
        if sight and sight.stamp == q.stamp and base and sight.used > base then
          redis.call("INCRBY", q.key, sight.used - base)
          redis.call("PEXPIRE", q.key, q.ttl)
          redis.call("SET", q.base_key, string.format("%.0f", sight.used), "PX", q.ttl)
          q.used = q.used + sight.used - base
        end
      end
    end
  end

  -- What is left of each quota (and the replay's cap and use).
  for _, q in ipairs(quotas) do
    remaining[q.i] = math.max(0, q.limit - q.used)
    if share then
      q.cap_key = KEYS[9] .. "cap:" .. q.name .. ":" .. q.stamp
      q.used_key = KEYS[9] .. "used:" .. q.name .. ":" .. q.stamp
      local cap = redis.call("GET", q.cap_key)
      q.cap = cap and tonumber(cap) or floor(share * remaining[q.i])
      q.replay_used = tonumber(redis.call("GET", q.used_key) or "0")
    end
  end

  -- The caller's next sight: "<epoch> <grants> <period>=<stamp>=<used> ..." after this decision.
  local function sight_of()
    if epoch == "" then return "" end
    local parts = {epoch, string.format("%.0f", granted_count)}
    for _, q in ipairs(quotas) do
      parts[#parts + 1] = q.name .. "=" .. q.stamp .. "=" .. string.format("%.0f", q.used)
    end
    return table.concat(parts, " ")
  end

  local function reply(granted, wait, reason, number)
    return {granted, math.ceil(wait), reason, remaining[1], remaining[2], remaining[3],
      remaining[4], tostring(rate), number or -1, sight_of()}
  end

  -- (1) A server's Retry-After blocks every worker, and so does its spent budget.
  local blocked = tonumber(redis.call("GET", KEYS[2]) or "0")
  if blocked > now then return reply(0, blocked - now, "blocked") end
  if server_left and server_left <= 0 then return reply(0, server_reset - now, "server") end

  -- (2) A spent quota holds calls until its period ends (or an override raises it); a replay that
  -- used its share of a quota is held until the period ends.
  for _, q in ipairs(quotas) do
    if q.used >= q.limit then return reply(0, q.stop * 1000000 - now, "quota:" .. q.name) end
  end
  if share then
    for _, q in ipairs(quotas) do
      if q.replay_used >= q.cap then
        return reply(0, q.stop * 1000000 - now, "replay-quota:" .. q.name)
      end
    end
  end

  -- (3) GCRA: emission interval T (rounded up: never faster than the rate), tolerance B*T. `slot`
  -- is the earliest moment the call conforms: max(now, tat - (B-1)*T).
  local interval = math.ceil(1000000 / rate)
  local tat = tonumber(redis.call("GET", KEYS[1]) or "0")
  local slot = math.max(now, tat - (burst - 1) * interval)
  local replay_interval, replay_tat
  if share then
    -- A replay's slot is the later of its bucket's and the shared bucket's, and may not lie past
    -- the shared TAT: then the shared bucket advances exactly as for a live call (see the header).
    replay_interval = math.ceil(1000000 / (rate * share))
    replay_tat = tonumber(redis.call("GET", KEYS[8]) or "0")
    local replay_slot = replay_tat - (math.max(1, floor(burst * share)) - 1) * replay_interval
    local horizon = math.max(now, tat)
    if replay_slot > horizon then return reply(0, replay_slot - horizon, "replay-rate") end
    slot = math.max(slot, replay_slot)
  end
  local wait = slot - now
  if wait > max_wait then return reply(0, wait - max_wait, "rate") end

  -- Reserve: a bucket is full again at its new TAT, so its key may vanish a second after that.
  local function reserve(key, old_tat, step)
    local new_tat = math.max(old_tat, slot) + step
    redis.call("SET", key, string.format("%.0f", new_tat), "PX", math.ceil((new_tat - now) / 1000) + 1000)
  end
  reserve(KEYS[1], tat, interval)
  if share then reserve(KEYS[8], replay_tat, replay_interval) end
  for _, q in ipairs(quotas) do
    local ttl = q.ttl
    redis.call("INCR", q.key)
    redis.call("PEXPIRE", q.key, ttl)
    if share then
      redis.call("SET", q.cap_key, string.format("%.0f", q.cap), "NX", "PX", ttl)
      redis.call("INCR", q.used_key)
      redis.call("PEXPIRE", q.used_key, ttl)
    end
    q.used = q.used + 1
    remaining[q.i] = math.max(0, q.limit - q.used)
  end

  -- (4) The grant's number; the counter outlives any server budget (at most 31 days).
  local number
  if KEYS[6] then
    number = redis.call("INCR", KEYS[6])
    redis.call("PEXPIRE", KEYS[6], GRANTED_TTL_MS)
    granted_count = number
  end

  -- (5) The shadow limit: measured at the call's slot, never enforced (see the header).
  local shadow_rate = ov["shadow_rate"]
  if KEYS[7] and shadow_rate and shadow_rate > 0 then
    local shadow_burst = math.max(1, ov["shadow_burst"] or 1)
    local shadow_interval = math.ceil(1000000 / shadow_rate)
    local tat_key = KEYS[7] .. "tat"
    local shadow_tat = tonumber(redis.call("GET", tat_key) or "0")
    local ttl = redis.call("PTTL", KEYS[3])
    if ttl <= 0 then ttl = 86400000 end
    if shadow_tat - (shadow_burst - 1) * shadow_interval > slot then
      redis.call("INCR", KEYS[7] .. "delayed")
      redis.call("PEXPIRE", KEYS[7] .. "delayed", ttl)
    else
      local new_tat = math.max(shadow_tat, slot) + shadow_interval
      redis.call("SET", tat_key, string.format("%.0f", new_tat), "PX",
        math.ceil((new_tat - now) / 1000) + 1000)
    end
    redis.call("INCR", KEYS[7] .. "calls")
    redis.call("PEXPIRE", KEYS[7] .. "calls", ttl)
  end
  return reply(1, wait, "", number)
end

-- Bulk: ARGV[11] = n answers n callers that sent these same arguments (one pipeline entry
-- instead of n): n decisions in a row, each after the one before and with its sight, as if
-- the n calls had come one after another. It stops at the first refusal or error, which the
-- callers not answered share (each would have got the same: a refusal changes nothing).
local count = tonumber(ARGV[11] or "")
if not count then return decide(ARGV[10]) end
local replies, sight = {}, ARGV[10]
for i = 1, count do
  local r = decide(sight)
  replies[i] = r
  if r.err or r[1] == 0 then break end
  sight = r[10]
end
return replies
