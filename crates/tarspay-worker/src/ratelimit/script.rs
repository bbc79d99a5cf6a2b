//! The limiter's Lua scripts. Each touches the keys of one merchant's limiter only (one hash
//! tag, so one slot on a cluster) and reads the Redis server's clock itself (`TIME`), in
//! microseconds: no worker's clock enters a decision.
//!
//! Times are kept as whole microseconds since the epoch (about 1.8e15, well inside the 2^53 a
//! Lua number holds exactly). A number handed to `redis.call` would be rendered with `%.14g`
//! and lose its last digits, so stored times are formatted with `%.0f` (`fmt`).

use redis::Script;
use std::sync::LazyLock;

/// Lua helpers: the server's clock in µs, exact integer text of a number, and a key lifetime
/// in ms that outlasts `until_us` (rounded up, plus one ms).
const HELPERS: &str = r#"
local function server_now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function fmt(n)
  return string.format('%.0f', n)
end
local function ms_until(now, until_us)
  return math.ceil((until_us - now) / 1000) + 1
end
"#;

/// One acquire: the slow-down pause, the in-flight leases and the GCRA, decided together.
///
/// KEYS: tat, inflight, slowed (one hash tag).
/// ARGV: emission interval µs, burst tolerance µs (interval · (burst − 1)), max in flight
/// (0 = no cap), lease ttl µs, lease token, in-flight poll µs.
///
/// Returns `{1, now_us, leases held including this one}` when granted, `{0, now_us, wait_us}`
/// when refused: `wait_us` is the earliest a retry can succeed, by the latest of the pause's
/// end, the GCRA's next conforming time and, when every slot is leased, the sooner of the
/// oldest lease's expiry and the poll interval (a release may free a slot at any moment).
/// A refused call writes nothing but the removal of expired leases: it consumes no rate.
pub(super) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{HELPERS}{}",
        r#"
local now = server_now_us()
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_in_flight = tonumber(ARGV[3])
local wait = 0

local slowed = tonumber(redis.call('GET', KEYS[3]) or '0')
if slowed > now then wait = slowed - now end

-- GCRA: a call conforms when now >= tat - tolerance; a grant moves tat one interval on.
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local conforming_at = tat - tolerance
if conforming_at - now > wait then wait = conforming_at - now end

local held = 0
if max_in_flight > 0 then
  -- Leases whose holder never released them (a killed worker) free their slot here.
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
  held = redis.call('ZCARD', KEYS[2])
  if held >= max_in_flight then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    local frees = tonumber(oldest[2]) - now
    local poll = tonumber(ARGV[6])
    if poll < frees then frees = poll end
    if frees < 1 then frees = 1 end
    if frees > wait then wait = frees end
  end
end

if wait > 0 then
  return {0, now, wait}
end

local new_tat = tat + interval
redis.call('SET', KEYS[1], fmt(new_tat), 'PX', ms_until(now, new_tat))
if max_in_flight > 0 then
  local ttl = tonumber(ARGV[4])
  redis.call('ZADD', KEYS[2], fmt(now + ttl), ARGV[5])
  local keep = ms_until(now, now + ttl)
  if redis.call('PTTL', KEYS[2]) < keep then
    redis.call('PEXPIRE', KEYS[2], keep)
  end
  held = held + 1
end
return {1, now, held}
"#
    ))
});

/// The gateway asked us to slow down (429, `Retry-After`): no grant before now + pause.
///
/// KEYS: tat, slowed. ARGV: pause µs, burst tolerance µs.
///
/// The pause only ever lengthens (a shorter `Retry-After` read later does not cut it). The TAT
/// is raised to at least the pause's end plus the burst tolerance: the burst credit is spent by
/// the pause, so the calls after it are granted on the rate's schedule from the pause's end
/// (one at the end, then one per emission interval), and a gateway that just refused us is not
/// met by a burst.
/// Returns the pause's end, µs on the server's clock.
pub(super) static SLOW_DOWN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{HELPERS}{}",
        r#"
local now = server_now_us()
local until_us = now + tonumber(ARGV[1])
local slowed = tonumber(redis.call('GET', KEYS[2]) or '0')
if slowed > until_us then
  until_us = slowed
else
  redis.call('SET', KEYS[2], fmt(until_us), 'PX', ms_until(now, until_us))
end
local floor = until_us + tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < floor then
  redis.call('SET', KEYS[1], fmt(floor), 'PX', ms_until(now, floor))
end
return until_us
"#
    ))
});
