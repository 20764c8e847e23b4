//! redis-server: one server without persistence, or a Redis Cluster of masters.

use crate::net::{free_port, free_port_pair, resp};
use crate::process::{Server, find_binary, on_fresh_ports};
use crate::proxy::FaultProxy;
use crate::tls::{self, TlsFiles};
use crate::{Error, STARTUP_TIMEOUT};
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Redis Cluster's bus listens on the client port plus this.
const CLUSTER_BUS_OFFSET: u16 = 10000;

/// How to start a Redis server: authentication and any extra configuration.
///
/// ```
/// let options = palisade_testkit::RedisOptions::default()
///     .password("hunter2")            // `requirepass` for the default user
///     .user("alice", "wonderland")    // an ACL user with access to every key and command
///     .arg("--maxmemory").arg("64mb");
/// ```
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    password: Option<String>,
    users: Vec<(String, String)>,
    extra: Vec<String>,
    tls: Option<TlsFiles>,
    /// `--tls-auth-clients optional` instead of Redis's default `yes`.
    tls_clients_optional: bool,
}

impl RedisOptions {
    /// Requires this password of the default user (`requirepass`).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Adds an ACL user with this password and access to every key, channel and command.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.users.push((name.into(), password.into()));
        self
    }

    /// Serves clients over TLS only: `--tls-port` on the server's port and `--port 0`, with
    /// `files.server_cert`, trusting client certificates signed by `files.ca`. Client
    /// certificates are required (Redis's default) unless [`tls_auth_clients`](Self::tls_auth_clients)
    /// says otherwise. [`Redis::url`] is then `rediss://127.0.0.1:PORT/`.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), palisade_testkit::Error> {
    /// let tls = palisade_testkit::TlsFiles::generate()?;
    /// let redis = palisade_testkit::Redis::start_with(
    ///     palisade_testkit::RedisOptions::default().tls(&tls).tls_auth_clients(false),
    /// )?;
    /// assert!(redis.url().starts_with("rediss://"));
    /// # Ok(()) }
    /// ```
    pub fn tls(mut self, files: &TlsFiles) -> Self {
        self.tls = Some(files.clone());
        self
    }

    /// With [`tls`](Self::tls): whether clients must present a certificate signed by the CA
    /// (`true`, the default: `--tls-auth-clients yes`) or may connect without one (`false`:
    /// `--tls-auth-clients optional`; a certificate that is presented must still be valid).
    pub fn tls_auth_clients(mut self, required: bool) -> Self {
        self.tls_clients_optional = !required;
        self
    }

    /// Adds a raw `redis-server` argument (e.g. `"--maxmemory"`, then `"64mb"`).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra.push(arg.into());
        self
    }

    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(password) = &self.password {
            args.extend(["--requirepass".to_string(), password.clone()]);
        }
        for (name, password) in &self.users {
            args.extend(
                [
                    "--user",
                    name,
                    "on",
                    &format!(">{password}"),
                    "~*",
                    "&*",
                    "+@all",
                ]
                .map(String::from),
            );
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The TLS arguments for a server on `port` (after every other argument: Redis keeps the
    /// last value of a repeated option, so `--port 0` wins over the plain port).
    fn tls_args(&self, port: u16) -> Vec<String> {
        let Some(files) = &self.tls else {
            return Vec::new();
        };
        let auth = if self.tls_clients_optional {
            "optional"
        } else {
            "yes"
        };
        vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            files.server_cert.display().to_string(),
            "--tls-key-file".into(),
            files.server_key.display().to_string(),
            "--tls-ca-cert-file".into(),
            files.ca.display().to_string(),
            "--tls-auth-clients".into(),
            auth.into(),
        ]
    }
}

/// A running `redis-server` (alone, or one node of a [`RedisCluster`]).
///
/// It keeps nothing on disk, so [`Redis::restart`] brings it back empty. Dropping the handle
/// kills the server.
#[derive(Debug)]
pub struct Redis {
    server: Server,
    addr: SocketAddr,
    cluster: bool,
    /// With TLS: the files, for the probe and for redis-server, which reads them on restarts.
    tls: Option<TlsFiles>,
    _dir: Option<TempDir>,
}

impl Redis {
    /// Starts a Redis server with no persistence on a free loopback port, and waits (at most
    /// [`STARTUP_TIMEOUT`]) until it answers `PING`.
    pub fn start() -> Result<Redis, Error> {
        Redis::start_with(RedisOptions::default())
    }

    /// Starts a Redis server with these options (see [`RedisOptions`]).
    pub fn start_with(options: RedisOptions) -> Result<Redis, Error> {
        on_fresh_ports(|| {
            let dir = tempfile::Builder::new()
                .prefix("palisade-redis-")
                .tempdir()
                .map_err(Error::io("creating a directory for redis-server"))?;
            let port = free_port().map_err(Error::io("finding a free port"))?;
            let mut redis = Redis::node(&dir, port, &options, false)?;
            redis.server.spawn()?;
            redis.wait_answering()?;
            redis._dir = Some(dir);
            Ok(redis)
        })
    }

    fn node(
        dir: &TempDir,
        port: u16,
        options: &RedisOptions,
        cluster: bool,
    ) -> Result<Redis, Error> {
        let program = find_binary("redis-server", "redis-server", "PALISADE_REDIS_SERVER_BIN")?;
        let node_dir = dir.path().join(format!("node-{port}"));
        std::fs::create_dir_all(&node_dir)
            .map_err(Error::io(format!("creating {}", node_dir.display())))?;
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            &node_dir.display().to_string(),
        ]
        .map(String::from)
        .into();
        if cluster {
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ]
                .map(String::from),
            );
        }
        args.extend(options.args());
        args.extend(options.tls_args(port));
        let label = format!("redis-server 127.0.0.1:{port}");
        let log = dir.path().join(format!("redis-{port}.log"));
        Ok(Redis {
            server: Server::new(label, program, args, log),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            cluster,
            tls: options.tls.clone(),
            _dir: None,
        })
    }

    fn wait_answering(&self) -> Result<(), Error> {
        self.server.wait_ready(|| self.answers())
    }

    /// Whether the server answers a command (an authentication error is an answer too).
    fn answers(&self) -> bool {
        if let Some(files) = &self.tls {
            return tls::redis_answers(self.addr, files);
        }
        matches!(resp(self.addr, "PING"), Ok(reply) if reply.starts_with("+PONG") || reply.starts_with("-NOAUTH"))
    }

    fn cluster_ok(&self) -> bool {
        matches!(resp(self.addr, "CLUSTER INFO"), Ok(reply) if reply.contains("cluster_state:ok"))
    }

    /// The URL for `redis::Client::open`: `redis://127.0.0.1:PORT/` (without credentials), or
    /// `rediss://127.0.0.1:PORT/` when started with [`RedisOptions::tls`].
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{}/", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Starts a [`FaultProxy`] in front of this server: a client connected to
    /// `format!("redis://{}/", proxy.addr())` can then be partitioned, slowed or reset while
    /// every other client still reaches the server. Each call starts another proxy.
    pub fn proxy(&self) -> Result<FaultProxy, Error> {
        FaultProxy::start(self.addr)
    }

    /// The process id, or `None` while killed.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Kills the server with `SIGKILL`.
    pub fn kill(&self) -> Result<(), Error> {
        self.server.kill()
    }

    /// Stops the server with `SIGSTOP`: connections stay open but nothing is answered.
    pub fn pause(&self) -> Result<(), Error> {
        self.server.signal(Signal::SIGSTOP)
    }

    /// Continues a paused server with `SIGCONT`.
    pub fn resume(&self) -> Result<(), Error> {
        self.server.signal(Signal::SIGCONT)
    }

    /// Kills the server if it runs, starts it again on the same port (empty: there is no
    /// persistence) and waits until it answers; a cluster node waits until the cluster is ok.
    pub fn restart(&self) -> Result<(), Error> {
        self.server.kill()?;
        self.server.spawn()?;
        if self.cluster {
            self.server.wait_ready(|| self.cluster_ok())
        } else {
            self.wait_answering()
        }
    }
}

/// A Redis Cluster of masters on loopback, with every hash slot assigned.
///
/// ```no_run
/// # fn main() -> Result<(), palisade_testkit::Error> {
/// let cluster = palisade_testkit::RedisCluster::start(3)?;
/// let client = cluster.urls(); // for redis::cluster::ClusterClient::new
/// cluster.node(1).pause()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Redis>,
    _dir: TempDir,
}

impl RedisCluster {
    /// Starts `masters` cluster-enabled servers (at least 3, as Redis requires), joins them
    /// with `redis-cli --cluster create`, and waits until every node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> Result<RedisCluster, Error> {
        assert!(masters >= 3, "Redis Cluster needs at least 3 masters");
        let cli = find_binary("redis-cli", "redis-tools", "PALISADE_REDIS_CLI_BIN")?;
        on_fresh_ports(|| {
            let dir = tempfile::Builder::new()
                .prefix("palisade-redis-cluster-")
                .tempdir()
                .map_err(Error::io("creating directories for redis-server"))?;
            let nodes = (0..masters)
                .map(|_| {
                    let port = free_port_pair(CLUSTER_BUS_OFFSET)
                        .map_err(Error::io("finding free ports"))?;
                    Redis::node(&dir, port, &RedisOptions::default(), true)
                })
                .collect::<Result<Vec<_>, _>>()?;
            nodes
                .iter()
                .try_for_each(|n| n.server.spawn().and_then(|()| n.wait_answering()))?;
            let cluster = RedisCluster { nodes, _dir: dir };
            cluster.create(&cli)?;
            Ok(cluster)
        })
    }

    fn create(&self, cli: &std::path::Path) -> Result<(), Error> {
        let output = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(self.nodes.iter().map(|n| n.addr.to_string()))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .map_err(Error::io("running redis-cli --cluster create"))?;
        if !output.status.success() {
            return Err(Error::Cluster {
                what: "redis",
                detail: format!(
                    "redis-cli --cluster create exited with {}: {}{}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            });
        }
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while !self.nodes.iter().all(Redis::cluster_ok) {
            if Instant::now() >= deadline {
                return Err(Error::Cluster {
                    what: "redis",
                    detail: format!("cluster_state did not become ok within {STARTUP_TIMEOUT:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Every node's URL, for `redis::cluster::ClusterClient::new`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }

    /// Node `index` (0-based), to kill, pause, resume or restart it.
    pub fn node(&self, index: usize) -> &Redis {
        &self.nodes[index]
    }

    /// How many nodes the cluster has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}
