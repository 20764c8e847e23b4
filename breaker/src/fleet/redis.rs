//! The fleet's Redis side: its keys, its two scripts, and the calls that run them.
//!
//! Keys of the breaker `name` under `prefix` (all with the hash tag `{name}`, so they live in one
//! Redis Cluster slot):
//! - `<prefix>{<name>}:state`: a hash with the fleet state, its generation, the open wait's end
//!   and the half-open probes (server milliseconds). No TTL: a forced state must outlive quiet
//!   periods; it is one small hash per breaker.
//! - `<prefix>{<name>}:window`: a hash of per-second buckets `c:<sec>`, `f:<sec>`, `s:<sec>`
//!   (calls, failures, slow calls; seconds of the server's clock) and `lo`, the oldest second
//!   that may still hold fields. Expires `window + 1` s after its last write.
//! - channel `<prefix>{<name>}:changed`: a message on every transition (its text is
//!   `<state>:<generation>`; receivers just sync).
//!
//! The scripts are the [`Model`](super::decide::Model) in Lua; a test below runs both on the
//! same sequences and compares every reply.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use redis::aio::MultiplexedConnection;

use super::FleetError;
use super::decide::{Counts, FleetState, Params, SyncInput, SyncReply};

/// The Redis keys and channel of one fleet breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Keys {
    pub(crate) state: String,
    pub(crate) window: String,
    pub(crate) channel: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, name: &str) -> Keys {
        let base = format!("{prefix}{{{name}}}");
        Keys {
            state: format!("{base}:state"),
            window: format!("{base}:window"),
            channel: format!("{base}:changed"),
        }
    }
}

/// Common head of both scripts: the time (ARGV[1], or the server's `TIME` when empty), the
/// stored state, and the transitions.
const HEAD: &str = r#"
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local sec = math.floor(now / 1000)
local f = redis.call('HMGET', KEYS[1], 'state', 'gen', 'until', 'opened', 'hos', 'issued', 'pc', 'pf', 'ps')
local state = f[1] or 'closed'
local gen = tonumber(f[2]) or 0
local open_until = tonumber(f[3]) or 0
local opened = tonumber(f[4]) or 0
local hos = tonumber(f[5]) or 0
local issued = tonumber(f[6]) or 0
local pc = tonumber(f[7]) or 0
local pf = tonumber(f[8]) or 0
local ps = tonumber(f[9]) or 0
local changed = false
local dirty = false
local function enter(s)
  state = s
  gen = gen + 1
  issued = 0
  pc = 0
  pf = 0
  ps = 0
  changed = true
end
local function close()
  enter('closed')
  redis.call('DEL', KEYS[2])
end
local codes = {closed = 0, open = 1, half_open = 2, forced_open = 3, disabled = 4}
local function finish(granted)
  if changed or dirty then
    redis.call('HSET', KEYS[1], 'state', state, 'gen', gen, 'until', open_until, 'opened', opened,
      'hos', hos, 'issued', issued, 'pc', pc, 'pf', pf, 'ps', ps)
  end
  if changed then
    redis.call('PUBLISH', ARGV[2], state .. ':' .. gen)
  end
  local remaining = 0
  if state == 'open' then remaining = math.max(open_until - now, 0) end
  return {codes[state], gen, remaining, granted, opened}
end
"#;

/// One sync of one process. ARGV: 1 now_ms or '', 2 channel, 3-5 reported calls / failures /
/// slow, 6 probe generation, 7-9 probe calls / failures / slow, 10 give-back generation,
/// 11 give-back count, 12 want a probe (0/1), 13 window seconds, 14 minimum calls, 15 failure
/// threshold, 16 slow threshold, 17 wait in open ms, 18 half-open permits, 19 half-open timeout
/// ms. Reply: {state code, generation, open remaining ms, probe granted 0/1, opened at ms}.
const SYNC: &str = r#"
local window = tonumber(ARGV[13])
local minimum = tonumber(ARGV[14])
local fthr = tonumber(ARGV[15])
local sthr = tonumber(ARGV[16])
local wait = tonumber(ARGV[17])
local permits = tonumber(ARGV[18])
local hot = tonumber(ARGV[19])
local function trips(c, fl, sl, min)
  return c > 0 and c >= min and (fl / c >= fthr or sl / c >= sthr)
end
local function open()
  enter('open')
  open_until = now + wait
  opened = now
end
if state == 'open' and now >= open_until then
  enter('half_open')
  hos = now
end
if state == 'half_open' and now - hos >= hot then
  open()
end
local calls = tonumber(ARGV[3])
if calls > 0 and state == 'closed' then
  local cf, ff, sf = 'c:' .. sec, 'f:' .. sec, 's:' .. sec
  redis.call('HINCRBY', KEYS[2], cf, calls)
  redis.call('HINCRBY', KEYS[2], ff, tonumber(ARGV[4]))
  redis.call('HINCRBY', KEYS[2], sf, tonumber(ARGV[5]))
  -- Drop the seconds that left the window since the last write (at most window + 1 of them:
  -- the hash expires after that long without writes).
  local first = sec - window + 1
  local lo = tonumber(redis.call('HGET', KEYS[2], 'lo')) or first
  for s = lo, first - 1 do
    redis.call('HDEL', KEYS[2], 'c:' .. s, 'f:' .. s, 's:' .. s)
  end
  if lo < first then lo = first end
  redis.call('HSET', KEYS[2], 'lo', lo)
  redis.call('PEXPIRE', KEYS[2], (window + 1) * 1000)
  local fields = {}
  for s = first, sec do
    fields[#fields + 1] = 'c:' .. s
    fields[#fields + 1] = 'f:' .. s
    fields[#fields + 1] = 's:' .. s
  end
  local v = redis.call('HMGET', KEYS[2], unpack(fields))
  local c, fl, sl = 0, 0, 0
  for i = 1, #v, 3 do
    c = c + (tonumber(v[i]) or 0)
    fl = fl + (tonumber(v[i + 1]) or 0)
    sl = sl + (tonumber(v[i + 2]) or 0)
  end
  if trips(c, fl, sl, minimum) then open() end
end
local pcalls = tonumber(ARGV[7])
if pcalls > 0 and state == 'half_open' and tonumber(ARGV[6]) == gen then
  pc = pc + pcalls
  pf = pf + tonumber(ARGV[8])
  ps = ps + tonumber(ARGV[9])
  dirty = true
  if pc >= permits then
    if trips(pc, pf, ps, permits) then open() else close() end
  end
end
local back = tonumber(ARGV[11])
if back > 0 and state == 'half_open' and tonumber(ARGV[10]) == gen then
  issued = math.max(issued - back, 0)
  dirty = true
end
local granted = 0
if ARGV[12] == '1' and state == 'half_open' and issued < permits then
  issued = issued + 1
  granted = 1
  dirty = true
end
return finish(granted)
"#;

/// An operator's command. ARGV: 1 now_ms or '', 2 channel, 3 the target state (`forced_open`,
/// `disabled`, or `closed` for a reset with an empty window). Same reply as the sync script.
const COMMAND: &str = r#"
if ARGV[3] == 'closed' then close() else enter(ARGV[3]) end
return finish(0)
"#;

static SYNC_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{HEAD}{SYNC}")));
static COMMAND_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{HEAD}{COMMAND}")));

fn parse(reply: &[i64]) -> Result<SyncReply, FleetError> {
    let bad = || FleetError::UnexpectedReply(format!("{reply:?}"));
    let [code, generation, remaining, granted, opened] = reply else {
        return Err(bad());
    };
    let num = |v: &i64| u64::try_from(*v).map_err(|_| bad());
    Ok(SyncReply {
        state: FleetState::from_code(*code).ok_or_else(bad)?,
        generation: num(generation)?,
        open_remaining_ms: num(remaining)?,
        probe_granted: *granted == 1,
        opened_at_ms: num(opened)?,
    })
}

async fn run(
    conn: &mut MultiplexedConnection,
    inv: redis::ScriptInvocation<'_>,
    timeout: Duration,
) -> Result<SyncReply, FleetError> {
    let reply: Vec<i64> = match tokio::time::timeout(timeout, inv.invoke_async(conn)).await {
        Err(_elapsed) => return Err(FleetError::Timeout(timeout)),
        Ok(Err(e)) => return Err(classify(e, timeout)),
        Ok(Ok(reply)) => reply,
    };
    parse(&reply)
}

/// The connection's own timeouts are reported as ours.
fn classify(e: ::redis::RedisError, timeout: Duration) -> FleetError {
    if e.is_timeout() {
        FleetError::Timeout(timeout)
    } else {
        FleetError::Redis(e)
    }
}

fn time_arg(now_ms: Option<u64>) -> String {
    now_ms.map(|t| t.to_string()).unwrap_or_default()
}

/// Runs one sync (at server time, or at `now_ms` in tests).
pub(crate) async fn sync(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    p: &Params,
    input: &SyncInput,
    now_ms: Option<u64>,
    timeout: Duration,
) -> Result<SyncReply, FleetError> {
    let mut inv = SYNC_SCRIPT.prepare_invoke();
    inv.key(&keys.state).key(&keys.window);
    inv.arg(time_arg(now_ms)).arg(&keys.channel);
    let Counts {
        calls,
        failures,
        slow,
    } = input.report;
    inv.arg(calls).arg(failures).arg(slow);
    inv.arg(input.probe_gen)
        .arg(input.probes.calls)
        .arg(input.probes.failures)
        .arg(input.probes.slow);
    inv.arg(input.give_back_gen).arg(input.give_back);
    inv.arg(u8::from(input.want_probe));
    inv.arg(p.window_secs)
        .arg(p.minimum_calls)
        .arg(p.failure_rate_threshold.to_string())
        .arg(p.slow_call_rate_threshold.to_string())
        .arg(p.wait_in_open_ms)
        .arg(p.half_open_permits)
        .arg(p.half_open_timeout_ms);
    run(conn, inv, timeout).await
}

/// Sets the fleet state to `to` (`ForcedOpen`, `Disabled`, or `Closed` for a reset).
pub(crate) async fn command(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    to: FleetState,
    now_ms: Option<u64>,
    timeout: Duration,
) -> Result<SyncReply, FleetError> {
    let mut inv = COMMAND_SCRIPT.prepare_invoke();
    inv.key(&keys.state).key(&keys.window);
    inv.arg(time_arg(now_ms))
        .arg(&keys.channel)
        .arg(to.as_str());
    run(conn, inv, timeout).await
}

/// A multiplexed connection whose connection attempts and replies time out after `timeout`.
pub(crate) async fn connect(
    client: &redis::Client,
    timeout: Duration,
) -> Result<MultiplexedConnection, FleetError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    match tokio::time::timeout(
        timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    {
        Err(_elapsed) => Err(FleetError::Timeout(timeout)),
        Ok(Err(e)) => Err(classify(e, timeout)),
        Ok(Ok(conn)) => Ok(conn),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::decide::Model;

    /// A small deterministic generator (xorshift), so a failing sequence can be replayed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// The script and the Rust model give the same reply to every step of random sequences of
    /// reports, probe outcomes (of the current and of an earlier period), probe requests and
    /// give-backs, operator commands and clock advances.
    #[tokio::test]
    async fn the_script_agrees_with_the_model() {
        let server = palisade_testkit::Redis::start().expect("start redis-server");
        let client = ::redis::Client::open(server.url()).unwrap();
        let mut conn = connect(&client, Duration::from_secs(5)).await.unwrap();
        let p = Params {
            window_secs: 3,
            minimum_calls: 5,
            failure_rate_threshold: 0.5,
            slow_call_rate_threshold: 0.8,
            wait_in_open_ms: 2_000,
            half_open_permits: 2,
            half_open_timeout_ms: 5_000,
        };
        let timeout = Duration::from_secs(5);
        let mut transitions = 0;
        for seed in 1..=40u64 {
            let keys = Keys::new("agree:", &format!("b{seed}"));
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut model = Model::default();
            let mut now = 1_800_000_000_000 + rng.below(1000);
            let mut last_gen = 0;
            for step in 0..150 {
                now += match rng.below(4) {
                    0 => 0,
                    1 => rng.below(50),
                    2 => rng.below(700),
                    _ => rng.below(2_500),
                };
                let (expected, got) = if rng.below(25) == 0 {
                    let to = [
                        FleetState::ForcedOpen,
                        FleetState::Disabled,
                        FleetState::Closed,
                    ][rng.below(3) as usize];
                    let got = command(&mut conn, &keys, to, Some(now), timeout).await;
                    (model.command(to), got)
                } else {
                    let calls = rng.below(6);
                    let failures = rng.below(calls + 1);
                    let pcalls = rng.below(2) * rng.below(3);
                    let input = SyncInput {
                        report: Counts {
                            calls,
                            failures,
                            slow: rng.below(calls + 1),
                        },
                        probes: Counts {
                            calls: pcalls,
                            failures: rng.below(pcalls + 1),
                            slow: rng.below(pcalls + 1),
                        },
                        probe_gen: last_gen - rng.below(2).min(last_gen),
                        give_back: u32::from(rng.below(6) == 0),
                        give_back_gen: last_gen,
                        want_probe: rng.below(2) == 0,
                    };
                    let got = sync(&mut conn, &keys, &p, &input, Some(now), timeout).await;
                    (model.sync(&p, now, input), got)
                };
                let got = got.unwrap();
                assert_eq!(got, expected, "seed {seed}, step {step}");
                if got.generation != last_gen {
                    transitions += 1;
                }
                last_gen = got.generation;
            }
        }
        assert!(
            transitions > 200,
            "the sequences hardly moved: {transitions} transitions"
        );
    }

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("p:", "api");
        assert_eq!(k.state, "p:{api}:state");
        assert_eq!(k.window, "p:{api}:window");
        assert_eq!(k.channel, "p:{api}:changed");
    }
}
