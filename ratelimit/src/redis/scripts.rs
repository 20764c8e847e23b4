//! The Lua scripts, one per algorithm. Each decides one request against every limit passed in
//! KEYS (all keys share one hash tag, so one Cluster slot) atomically, implementing exactly the
//! arithmetic of [`crate::algorithm`].
//!
//! Calling convention (all three):
//! - `KEYS[i]`: the key of limit `i`.
//! - `ARGV[1]`: the time in µs, or the empty string to read the server's `TIME` (production
//!   always sends the empty string; tests inject times to replay sequences).
//! - `ARGV[2]`: the cost; 0 is a peek, which records nothing (and writes nothing but the
//!   sliding log's trimming of expired members).
//! - `ARGV[3 + 3(i-1)..]`: `max`, `window_us`, `burst` of limit `i`.
//!
//! Reply: `{allowed, now_us, remaining_1, retry_after_us_1, reset_after_us_1, ...}`, integers.
//!
//! Numbers are Lua doubles; every value stays below 2^53 so integers are exact. Redis turns number
//! arguments of `redis.call` into strings with 17 significant digits, so scores and counts are
//! stored exactly; member strings are built with `%d`.

const PRELUDE: &str = r#"
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local cost = tonumber(ARGV[2])
local n = #KEYS
local function param(i, j) return tonumber(ARGV[3 + 3 * (i - 1) + j]) end
local function ttl_ms(us) return math.max(1, math.ceil(us / 1000)) end
local out = {0, now}
local allowed = 1
"#;

/// The exact sliding log on sorted sets, [`crate::algorithm::SlidingLog`]: one member per
/// admitted decision, score = its time in µs (never below the newest score), member =
/// `<end>:<cost>` where `end` (zero-padded to 16 digits, so equal scores sort by it) is the running
/// total of units admitted on the key through that decision. Every step is O(log N) in the
/// members of the key, whatever the cost and the limit: `ZCOUNT` and `ZRANGE` by rank on the skip
/// list, a binary search by rank on denial, and at most `TRIM` expired members removed per call.
pub(crate) const SLIDING_LOG: &str = r#"
local TRIM = 64
local function parse(member)
  local e, c = string.match(member, '^(%d+):(%d+)$')
  return tonumber(e), tonumber(c)
end
local newest_at, newest_end = {}, {}
for i = 1, n do
  local key, max, window = KEYS[i], param(i, 0), param(i, 1)
  local horizon = now - window
  local expired = redis.call('ZCOUNT', key, '-inf', horizon)
  if expired > 0 then
    local drop = math.min(expired, TRIM)
    redis.call('ZREMRANGEBYRANK', key, 0, drop - 1)
    expired = expired - drop
  end
  local count, reset, start = 0, 0, 0
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if newest[1] then
    newest_at[i] = tonumber(newest[2])
    newest_end[i] = parse(newest[1])
    if newest_at[i] > horizon then
      local e, c = parse(redis.call('ZRANGE', key, expired, expired)[1])
      start = e - c
      count = newest_end[i] - start
      reset = newest_at[i] + window - now
    end
  end
  local base = 3 * i
  if count + cost <= max then
    out[base] = max - count - cost
    out[base + 1] = 0
  else
    allowed = 0
    out[base] = math.max(0, max - count)
    -- The first member whose expiry frees k units: binary search by rank on `end`.
    local k = count + cost - max
    local lo, hi = expired, redis.call('ZCARD', key) - 1
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local e = parse(redis.call('ZRANGE', key, mid, mid)[1])
      if e - start >= k then hi = mid else lo = mid + 1 end
    end
    local at = redis.call('ZRANGE', key, lo, lo, 'WITHSCORES')[2]
    out[base + 1] = tonumber(at) + window - now
  end
  out[base + 2] = reset
end
if allowed == 1 and cost > 0 then
  for i = 1, n do
    local key, max, window = KEYS[i], param(i, 0), param(i, 1)
    local at = math.max(now, newest_at[i] or now)
    local e = (newest_end[i] or 0) + cost
    redis.call('ZADD', key, at, string.format('%016d:%d', e, cost))
    out[3 * i + 2] = at + window - now
    redis.call('PEXPIRE', key, ttl_ms(at + window - now))
  end
end
out[1] = allowed
return out
"#;

/// The sliding window counter on one hash per key: `w` (window index), `c`, `p`.
pub(crate) const WINDOW_COUNTER: &str = r#"
local state = {}
for i = 1, n do
  local key, max, window = KEYS[i], param(i, 0), param(i, 1)
  local w = math.floor(now / window)
  if w * window > now then w = w - 1 elseif (w + 1) * window <= now then w = w + 1 end
  local h = redis.call('HMGET', key, 'w', 'c', 'p')
  local sw = tonumber(h[1])
  local c, p = 0, 0
  if sw then
    if sw > w then w = sw end
    if sw == w then
      c, p = tonumber(h[2]) or 0, tonumber(h[3]) or 0
    elseif sw == w - 1 then
      p = tonumber(h[2]) or 0
    end
  end
  local elapsed = math.max(0, now - w * window)
  local function weighted(prev, e) return math.floor(prev * (window - e) / window) end
  local function first_fit(prev, avail)
    if prev <= avail then return 0 end
    local e = math.floor(window - (avail + 1) * window / prev) + 1
    return math.min(math.max(e, 0), window)
  end
  local estimate = weighted(p, elapsed) + c
  local base = 3 * i
  local reset = 0
  if c > 0 then reset = (w + 2) * window - now elseif p > 0 then reset = (w + 1) * window - now end
  if estimate + cost <= max then
    out[base] = max - estimate - cost
    out[base + 1] = 0
  else
    allowed = 0
    out[base] = math.max(0, max - estimate)
    local at = window
    if max - c - cost >= 0 then at = math.max(first_fit(p, max - c - cost), elapsed + 1) end
    if at < window then
      out[base + 1] = at - elapsed
    else
      out[base + 1] = (w + 1) * window + first_fit(c, max - cost) - now
    end
  end
  out[base + 2] = reset
  state[i] = {w, c, p, elapsed}
end
if allowed == 1 and cost > 0 then
  for i = 1, n do
    local key, max, window = KEYS[i], param(i, 0), param(i, 1)
    local w, c, p, elapsed = state[i][1], state[i][2] + cost, state[i][3], state[i][4]
    redis.call('HSET', key, 'w', w, 'c', c, 'p', p)
    local reset = (w + 2) * window - now
    redis.call('PEXPIRE', key, ttl_ms(reset))
    out[3 * i] = math.max(0, max - (math.floor(p * (window - elapsed) / window) + c))
    out[3 * i + 2] = reset
  end
end
out[1] = allowed
return out
"#;

/// GCRA on one string per key: the theoretical arrival time in µs.
pub(crate) const GCRA: &str = r#"
local tats = {}
for i = 1, n do
  local key, max, window, burst = KEYS[i], param(i, 0), param(i, 1), param(i, 2)
  local t = math.floor((window + max - 1) / max)
  local tau = t * burst
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + t * cost
  local diff = now - (new_tat - tau)
  local base = 3 * i
  if diff < 0 then
    allowed = 0
    out[base] = math.max(0, math.floor((now + tau - tat) / t))
    out[base + 1] = -diff
    out[base + 2] = tat - now
  else
    out[base] = math.floor(diff / t)
    out[base + 1] = 0
    out[base + 2] = new_tat - now
  end
  tats[i] = new_tat
end
if allowed == 1 and cost > 0 then
  for i = 1, n do
    redis.call('SET', KEYS[i], string.format('%d', tats[i]), 'PX', ttl_ms(tats[i] - now))
  end
end
out[1] = allowed
return out
"#;

/// The full text of a script: the shared prelude followed by the algorithm's body.
pub(crate) fn full(body: &str) -> String {
    format!("{PRELUDE}{body}")
}
