//! Run-once records on Redis: one hash per key, every operation one Lua script.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::{Claim, IdempotencyStore, OwnerToken};
use crate::error::{Error, Result};

/// Returns `{"acquired"}` after claiming, or `{state, fingerprint, result}` of the record there.
/// KEYS[1] record; ARGV: fingerprint, owner, in_progress_ttl ms.
const CLAIM: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  return {state, redis.call('HGET', KEYS[1], 'fp') or '', redis.call('HGET', KEYS[1], 'result') or ''}
end
redis.call('HSET', KEYS[1], 'state', 'in_progress', 'fp', ARGV[1], 'owner', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'acquired'}
";

/// 1 if `owner` held the claim and the result is recorded (or `owner` had recorded it already:
/// a retry of a complete whose reply was lost), else 0. The completed record keeps `owner` for
/// that check. KEYS[1] record; ARGV: owner, result, ttl ms.
const COMPLETE: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
if state == 'in_progress' then
  redis.call('HSET', KEYS[1], 'state', 'completed', 'result', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if state == 'completed' then
  return 1
end
return 0
";

/// Renews the claim if `owner` holds it: 1, else 0. KEYS[1] record; ARGV: owner, ttl ms.
const EXTEND: &str = r"
if redis.call('HGET', KEYS[1], 'state') == 'in_progress' and redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Deletes the record if `owner` holds its claim. KEYS[1] record; ARGV: owner.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'state') == 'in_progress' and redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Run-once records on Redis, shared by every process of a fleet.
///
/// Each key is a hash `<prefix><key>` with fields `state`, `fp`, `owner`, `result`; claims and
/// results expire with Redis's own `PEXPIRE` (the server's clock). Claim, complete and release are
/// each one Lua script (run with EVALSHA, reloaded on NOSCRIPT), so the owner-token comparison and
/// the write are atomic. Credentials and TLS come from the URL (`redis://user:pw@host/`,
/// `rediss://`). Each record is one key, so the store works on Redis Cluster as well
/// ([`RedisStore::connect_cluster`]).
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    claim: redis::Script,
    complete: redis::Script,
    release: redis::Script,
    extend: redis::Script,
}

/// A standalone or a cluster connection; both reconnect by themselves.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// How a store's connection (re)connects: 3 attempts, at most a second apart.
fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

impl RedisStore {
    /// Connects to `url` with the key prefix `palisade:idem:`. A `rediss://` URL needs the `tls`
    /// feature and trusts the system's roots (webpki); for a private CA or a client certificate
    /// use `RedisStore::connect_with_tls` (with the `tls` feature). Gives up after 3 attempts, so
    /// that a refused password or an unreachable server is an error in about a second (the
    /// client's default of 7 attempts took several seconds to say a password was wrong).
    pub async fn connect(url: &str) -> Result<Self> {
        #[cfg(feature = "tls")]
        install_crypto_provider();
        let client = redis::Client::open(url).map_err(|source| Error::Redis {
            op: "open client",
            source,
        })?;
        let conn = client
            .get_connection_manager_with_config(manager_config())
            .await
            .map_err(|source| Error::Redis {
                op: "connect",
                source,
            })?;
        Ok(Self::with_connection(conn, "palisade:idem:"))
    }

    /// Connects to a `rediss://` URL trusting the CA in `certs.root_cert` (PEM; `None`: the
    /// system's roots) and presenting `certs.client_tls` (a PEM certificate and key), if any, with
    /// the key prefix `palisade:idem:`. Needs the `tls` feature. Gives up after 3 attempts (about
    /// a second when the server refuses a certificate); a refused certificate is an
    /// [`Error::Redis`] whose source holds rustls's reason.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use redis::{ClientTlsConfig, TlsCertificates};
    /// let certs = TlsCertificates {
    ///     root_cert: Some(std::fs::read("/etc/redis/ca.pem")?),
    ///     client_tls: Some(ClientTlsConfig {
    ///         client_cert: std::fs::read("/etc/palisade/client.pem")?,
    ///         client_key: std::fs::read("/etc/palisade/client-key.pem")?,
    ///     }),
    /// };
    /// let store = palisade_idempotency::RedisStore::connect_with_tls("rediss://redis:6380/", certs).await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    pub async fn connect_with_tls(url: &str, certs: redis::TlsCertificates) -> Result<Self> {
        install_crypto_provider();
        let client = redis::Client::build_with_tls(url, certs).map_err(|source| Error::Redis {
            op: "open TLS client",
            source,
        })?;
        let conn = client
            .get_connection_manager_with_config(manager_config())
            .await
            .map_err(|source| Error::Redis {
                op: "connect",
                source,
            })?;
        Ok(Self::with_connection(conn, "palisade:idem:"))
    }

    /// Connects to a Redis Cluster through any of its nodes' URLs, with the key prefix
    /// `palisade:idem:`.
    pub async fn connect_cluster(urls: &[String]) -> Result<Self> {
        #[cfg(feature = "tls")]
        install_crypto_provider();
        let client = redis::cluster::ClusterClient::new(urls.iter().map(String::as_str)).map_err(
            |source| Error::Redis {
                op: "open cluster client",
                source,
            },
        )?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(|source| Error::Redis {
                op: "connect to cluster",
                source,
            })?;
        Ok(Self::from_conn(
            Conn::Cluster(conn),
            "palisade:idem:".into(),
        ))
    }

    /// Uses an existing connection manager and key prefix.
    pub fn with_connection(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self::from_conn(Conn::Single(conn), prefix.into())
    }

    /// Changes the key prefix (the namespace of every record).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    fn from_conn(conn: Conn, prefix: String) -> Self {
        Self {
            conn,
            prefix,
            claim: redis::Script::new(CLAIM),
            complete: redis::Script::new(COMPLETE),
            release: redis::Script::new(RELEASE),
            extend: redis::Script::new(EXTEND),
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }
}

/// rustls needs a process-wide crypto provider and the redis crate selects none; use ring
/// unless the application installed one already.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: any provider will do.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<Claim> {
        let owner = OwnerToken::random();
        let mut inv = self.claim.key(self.key(key));
        inv.arg(fingerprint)
            .arg(owner.as_str())
            .arg(ms(in_progress_ttl));
        let reply: Vec<String> = self
            .conn
            .invoke(&inv)
            .await
            .map_err(|source| Error::Redis {
                op: "claim",
                source,
            })?;
        match reply.as_slice() {
            [s] if s == "acquired" => Ok(Claim::Acquired(owner)),
            [s, fp, _] if s == "in_progress" => Ok(Claim::InProgress {
                fingerprint: fp.clone(),
            }),
            [s, fp, result] if s == "completed" => Ok(Claim::Completed {
                fingerprint: fp.clone(),
                result: result.clone(),
            }),
            _ => Err(Error::Redis {
                op: "claim",
                source: redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "unexpected reply from the claim script",
                )),
            }),
        }
    }

    async fn complete(
        &self,
        key: &str,
        owner: &OwnerToken,
        result: &str,
        ttl: Duration,
    ) -> Result<()> {
        let mut inv = self.complete.key(self.key(key));
        inv.arg(owner.as_str()).arg(result).arg(ms(ttl));
        let done: i64 = self
            .conn
            .invoke(&inv)
            .await
            .map_err(|source| Error::Redis {
                op: "complete",
                source,
            })?;
        if done == 1 {
            Ok(())
        } else {
            Err(Error::OwnershipLost {
                key: key.to_string(),
            })
        }
    }

    async fn extend(&self, key: &str, owner: &OwnerToken, ttl: Duration) -> Result<bool> {
        let mut inv = self.extend.key(self.key(key));
        inv.arg(owner.as_str()).arg(ttl.as_millis().max(1) as u64);
        let renewed: i64 = self
            .conn
            .invoke(&inv)
            .await
            .map_err(|source| Error::Redis {
                op: "extend claim",
                source,
            })?;
        Ok(renewed == 1)
    }

    async fn release(&self, key: &str, owner: &OwnerToken) -> Result<()> {
        let mut inv = self.release.key(self.key(key));
        inv.arg(owner.as_str());
        let _: i64 = self
            .conn
            .invoke(&inv)
            .await
            .map_err(|source| Error::Redis {
                op: "release",
                source,
            })?;
        Ok(())
    }
}
