//! etcd: one server, or a cluster of several members on loopback.

use crate::net::{free_port, http};
use crate::process::{Server, find_binary, on_fresh_ports};
use crate::{Error, STARTUP_TIMEOUT};
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A running `etcd` server (alone, or one member of an [`EtcdCluster`]).
///
/// Dropping the handle kills the server and deletes its data directory.
#[derive(Debug)]
pub struct Etcd {
    server: Server,
    client: SocketAddr,
    // Kept for its Drop (removes the data directory); only the standalone server owns one.
    _dir: Option<TempDir>,
}

struct MemberPorts {
    name: String,
    client: u16,
    peer: u16,
}

impl Etcd {
    /// Starts a single-member etcd on free loopback ports with a fresh data directory, and
    /// waits (at most [`STARTUP_TIMEOUT`]) until it answers `/health`.
    pub fn start() -> Result<Etcd, Error> {
        on_fresh_ports(|| {
            let dir = tempfile::Builder::new()
                .prefix("palisade-etcd-")
                .tempdir()
                .map_err(Error::io("creating a data directory for etcd"))?;
            let ports = [MemberPorts::pick("m0")?];
            let mut etcd = Etcd::member(&dir, &ports, 0)?;
            etcd.server.spawn()?;
            etcd.wait_healthy()?;
            etcd._dir = Some(dir);
            Ok(etcd)
        })
    }

    fn member(dir: &TempDir, cluster: &[MemberPorts], index: usize) -> Result<Etcd, Error> {
        let program = find_binary("etcd", "etcd-server", "PALISADE_ETCD_BIN")?;
        let me = &cluster[index];
        let initial_cluster = cluster
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let data_dir = dir.path().join(&me.name);
        let client_url = format!("http://127.0.0.1:{}", me.client);
        let peer_url = format!("http://127.0.0.1:{}", me.peer);
        let args = vec![
            format!("--name={}", me.name),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={initial_cluster}"),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=palisade-testkit".into(),
            // Fast elections, so that killing a leader costs a test half a second, not seconds.
            "--heartbeat-interval=50".into(),
            "--election-timeout=500".into(),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ];
        let label = format!("etcd {} (127.0.0.1:{})", me.name, me.client);
        let log = dir.path().join(format!("{}.log", me.name));
        Ok(Etcd {
            server: Server::new(label, program, args, log),
            client: SocketAddr::from(([127, 0, 0, 1], me.client)),
            _dir: None,
        })
    }

    fn wait_healthy(&self) -> Result<(), Error> {
        self.server.wait_ready(|| self.healthy())
    }

    fn healthy(&self) -> bool {
        matches!(http(self.client, "GET", "/health", ""),
                 Ok((200, body)) if body.contains("\"health\":\"true\""))
    }

    /// The client URLs, for `etcd_client::Client::connect`.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// The process id, or `None` while killed.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Kills the server with `SIGKILL` (no chance to clean up); its data directory stays.
    pub fn kill(&self) -> Result<(), Error> {
        self.server.kill()
    }

    /// Stops the server with `SIGSTOP`: it keeps its sockets open but answers nothing, as a
    /// server stuck in a long GC pause or on a frozen VM would.
    pub fn pause(&self) -> Result<(), Error> {
        self.server.signal(Signal::SIGSTOP)
    }

    /// Continues a paused server with `SIGCONT`.
    pub fn resume(&self) -> Result<(), Error> {
        self.server.signal(Signal::SIGCONT)
    }

    /// Kills the server if it runs, starts it again on the same ports with the same data
    /// directory, and waits until it answers `/health` (in a cluster, until it has a leader).
    pub fn restart(&self) -> Result<(), Error> {
        self.server.kill()?;
        self.server.spawn()?;
        self.wait_healthy()
    }

    /// This member's id and the leader's id, as it reports them (`/v3/maintenance/status`).
    fn status(&self) -> Option<(String, String)> {
        let (code, body) = http(self.client, "POST", "/v3/maintenance/status", "{}").ok()?;
        if code != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let id = json.get("header")?.get("member_id")?.as_str()?.to_string();
        let leader = json.get("leader")?.as_str()?.to_string();
        Some((id, leader))
    }
}

impl MemberPorts {
    fn pick(name: &str) -> Result<MemberPorts, Error> {
        let pick = || free_port().map_err(Error::io("finding a free port"));
        Ok(MemberPorts {
            name: name.to_string(),
            client: pick()?,
            peer: pick()?,
        })
    }
}

/// A cluster of etcd members on loopback, each with its own ports and data directory.
///
/// ```no_run
/// # fn main() -> Result<(), palisade_testkit::Error> {
/// let cluster = palisade_testkit::EtcdCluster::start(3)?;
/// let leader = cluster.leader()?;
/// cluster.member(leader).kill()?; // the other two elect a new leader
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Etcd>,
    _dir: TempDir,
}

impl EtcdCluster {
    /// Starts `size` members that form one cluster, and waits until every member is healthy.
    pub fn start(size: usize) -> Result<EtcdCluster, Error> {
        assert!(size > 0, "an etcd cluster needs at least one member");
        on_fresh_ports(|| {
            let dir = tempfile::Builder::new()
                .prefix("palisade-etcd-cluster-")
                .tempdir()
                .map_err(Error::io("creating data directories for etcd"))?;
            let ports = (0..size)
                .map(|i| MemberPorts::pick(&format!("m{i}")))
                .collect::<Result<Vec<_>, _>>()?;
            let members = (0..size)
                .map(|i| Etcd::member(&dir, &ports, i))
                .collect::<Result<Vec<_>, _>>()?;
            // All members must be running before any of them can elect a leader.
            members.iter().try_for_each(|m| m.server.spawn())?;
            members.iter().try_for_each(Etcd::wait_healthy)?;
            Ok(EtcdCluster { members, _dir: dir })
        })
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Etcd::endpoint).collect()
    }

    /// Member `index` (0-based), to kill, pause, resume or restart it.
    pub fn member(&self, index: usize) -> &Etcd {
        &self.members[index]
    }

    /// How many members the cluster has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The index of the current leader, waiting (at most [`STARTUP_TIMEOUT`]) until the
    /// running members agree on one.
    pub fn leader(&self) -> Result<usize, Error> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let statuses: Vec<Option<(String, String)>> =
                self.members.iter().map(Etcd::status).collect();
            let leader_id = statuses
                .iter()
                .flatten()
                .map(|(_, leader)| leader)
                .find(|leader| leader.as_str() != "0");
            if let Some(leader_id) = leader_id {
                let index = statuses
                    .iter()
                    .position(|s| s.as_ref().is_some_and(|(id, _)| id == leader_id));
                if let Some(index) = index {
                    return Ok(index);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Cluster {
                    what: "etcd",
                    detail: format!("no leader within {STARTUP_TIMEOUT:?}: {statuses:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
