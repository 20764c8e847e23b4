//! etcd: one server, or a cluster of several members on loopback.

use crate::net::{free_port, http};
use crate::process::{Server, find_binary, on_fresh_ports};
use crate::proxy::{FaultProxy, Mode};
use crate::tls::{self, TlsFiles};
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
    /// With client TLS (and client-certificate auth): the files, kept for the probe and for
    /// etcd, which reads them again on restarts.
    tls: Option<TlsFiles>,
    // Kept for its Drop (removes the data directory); only the standalone server owns one.
    _dir: Option<TempDir>,
}

struct MemberPorts {
    name: String,
    client: u16,
    peer: u16,
    /// The peer URL the other members dial: `peer` itself, or the port of a proxy in front of it.
    advertised_peer: u16,
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

    /// Starts a single-member etcd that serves clients over TLS only (`https://127.0.0.1:PORT`)
    /// with `files.server_cert`, and requires a client certificate signed by `files.ca`
    /// (`--client-cert-auth`); waits (at most [`STARTUP_TIMEOUT`]) until it answers `/health`
    /// over TLS. Peers still talk plain HTTP (there are none). [`Etcd::restart`] keeps TLS.
    pub fn start_tls(files: &TlsFiles) -> Result<Etcd, Error> {
        on_fresh_ports(|| {
            let dir = tempfile::Builder::new()
                .prefix("palisade-etcd-tls-")
                .tempdir()
                .map_err(Error::io("creating a data directory for etcd"))?;
            let ports = [MemberPorts::pick("m0")?];
            let mut etcd = Etcd::member_tls(&dir, &ports, 0, Some(files))?;
            etcd.server.spawn()?;
            etcd.wait_healthy()?;
            etcd._dir = Some(dir);
            Ok(etcd)
        })
    }

    /// Starts a single-member etcd (plain HTTP) with authentication enabled: a `root` user with
    /// `root_password` and the `root` role, then `auth enable`. Clients must then log in
    /// (`etcd_client::ConnectOptions::with_user("root", root_password)`); a request without a
    /// user fails with "user name is empty". [`Etcd::restart`] keeps the users (they are in the
    /// data directory).
    pub fn start_with_auth(root_password: &str) -> Result<Etcd, Error> {
        let etcd = Etcd::start()?;
        let password = serde_json::Value::from(root_password);
        let steps = [
            ("/v3/auth/role/add", r#"{"name":"root"}"#.to_string()),
            (
                "/v3/auth/user/add",
                format!(r#"{{"name":"root","password":{password}}}"#),
            ),
            (
                "/v3/auth/user/grant",
                r#"{"user":"root","role":"root"}"#.to_string(),
            ),
            ("/v3/auth/enable", "{}".to_string()),
        ];
        for (path, body) in steps {
            match http(etcd.client, "POST", path, &body) {
                Ok((200, _)) => {}
                Ok((code, answer)) => {
                    return Err(Error::Auth {
                        detail: format!("POST {path} answered {code}: {answer}"),
                    });
                }
                Err(source) => {
                    return Err(Error::Io {
                        context: format!("enabling auth on etcd (POST {path})"),
                        source,
                    });
                }
            }
        }
        Ok(etcd)
    }

    fn member(dir: &TempDir, cluster: &[MemberPorts], index: usize) -> Result<Etcd, Error> {
        Etcd::member_tls(dir, cluster, index, None)
    }

    fn member_tls(
        dir: &TempDir,
        cluster: &[MemberPorts],
        index: usize,
        tls: Option<&TlsFiles>,
    ) -> Result<Etcd, Error> {
        let program = find_binary("etcd", "etcd-server", "PALISADE_ETCD_BIN")?;
        let me = &cluster[index];
        let initial_cluster = cluster
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.advertised_peer))
            .collect::<Vec<_>>()
            .join(",");
        let data_dir = dir.path().join(&me.name);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{}", me.client);
        let peer_url = format!("http://127.0.0.1:{}", me.peer);
        let advertised_peer_url = format!("http://127.0.0.1:{}", me.advertised_peer);
        let mut args = vec![
            format!("--name={}", me.name),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={advertised_peer_url}"),
            format!("--initial-cluster={initial_cluster}"),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=palisade-testkit".into(),
            // Fast elections, so that killing a leader costs a test half a second, not seconds.
            "--heartbeat-interval=50".into(),
            "--election-timeout=500".into(),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ];
        if let Some(files) = tls {
            args.extend([
                format!("--cert-file={}", files.server_cert.display()),
                format!("--key-file={}", files.server_key.display()),
                format!("--trusted-ca-file={}", files.ca.display()),
                "--client-cert-auth".into(),
            ]);
        }
        let label = format!("etcd {} (127.0.0.1:{})", me.name, me.client);
        let log = dir.path().join(format!("{}.log", me.name));
        Ok(Etcd {
            server: Server::new(label, program, args, log),
            client: SocketAddr::from(([127, 0, 0, 1], me.client)),
            tls: tls.cloned(),
            _dir: None,
        })
    }

    fn wait_healthy(&self) -> Result<(), Error> {
        self.server.wait_ready(|| self.healthy())
    }

    fn healthy(&self) -> bool {
        if let Some(files) = &self.tls {
            return tls::etcd_healthy(self.client, files);
        }
        matches!(http(self.client, "GET", "/health", ""),
                 Ok((200, body)) if body.contains("\"health\":\"true\""))
    }

    /// The client URLs, for `etcd_client::Client::connect`.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https://` when started with
    /// [`Etcd::start_tls`]).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    /// The process id, or `None` while killed.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Starts a [`FaultProxy`] in front of this server's client URL: a client connected to
    /// `format!("http://{}", proxy.addr())` can then be partitioned, slowed or reset while every
    /// other client still reaches etcd. Each call starts another proxy.
    pub fn proxy(&self) -> Result<FaultProxy, Error> {
        FaultProxy::start(self.client)
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        self.client
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
        let peer = pick()?;
        Ok(MemberPorts {
            name: name.to_string(),
            client: pick()?,
            peer,
            advertised_peer: peer,
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
    /// One proxy in front of each member's peer URL, when started with them.
    peer_proxies: Vec<FaultProxy>,
    /// Each member's id as etcd writes it in the `X-Server-From` header of its peer requests.
    member_ids: Vec<String>,
    _dir: TempDir,
}

impl EtcdCluster {
    /// Starts `size` members that form one cluster, and waits until every member is healthy.
    pub fn start(size: usize) -> Result<EtcdCluster, Error> {
        EtcdCluster::start_cluster(size, false)
    }

    /// Like [`EtcdCluster::start`], with a [`FaultProxy`] in front of each member's peer URL, so
    /// that a test can cut one member off from the others ([`EtcdCluster::partition`]) while
    /// clients still reach every member.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), palisade_testkit::Error> {
    /// let cluster = palisade_testkit::EtcdCluster::start_with_peer_proxies(3)?;
    /// let leader = cluster.leader()?;
    /// cluster.partition(leader)?; // the other two elect a new leader; the old one has none
    /// cluster.heal(leader)?;
    /// # Ok(()) }
    /// ```
    pub fn start_with_peer_proxies(size: usize) -> Result<EtcdCluster, Error> {
        EtcdCluster::start_cluster(size, true)
    }

    fn start_cluster(size: usize, proxied: bool) -> Result<EtcdCluster, Error> {
        assert!(size > 0, "an etcd cluster needs at least one member");
        on_fresh_ports(|| {
            let dir = tempfile::Builder::new()
                .prefix("palisade-etcd-cluster-")
                .tempdir()
                .map_err(Error::io("creating data directories for etcd"))?;
            let mut ports = (0..size)
                .map(|i| MemberPorts::pick(&format!("m{i}")))
                .collect::<Result<Vec<_>, _>>()?;
            let mut peer_proxies = Vec::new();
            if proxied {
                for member in &mut ports {
                    let upstream = SocketAddr::from(([127, 0, 0, 1], member.peer));
                    let proxy = FaultProxy::start_classified(upstream, Some(peer_sender))?;
                    member.advertised_peer = proxy.addr().port();
                    peer_proxies.push(proxy);
                }
            }
            let members = (0..size)
                .map(|i| Etcd::member(&dir, &ports, i))
                .collect::<Result<Vec<_>, _>>()?;
            // All members must be running before any of them can elect a leader.
            members.iter().try_for_each(|m| m.server.spawn())?;
            members.iter().try_for_each(Etcd::wait_healthy)?;
            let member_ids = members
                .iter()
                .map(|m| m.status().map(|(id, _)| header_id(&id)).unwrap_or_default())
                .collect();
            Ok(EtcdCluster {
                members,
                peer_proxies,
                member_ids,
                _dir: dir,
            })
        })
    }

    /// The proxy in front of member `index`'s peer URL (every connection another member dials
    /// to it), or `None` when the cluster was started without peer proxies.
    pub fn peer_proxy(&self, index: usize) -> Option<&FaultProxy> {
        self.peer_proxies.get(index)
    }

    /// Cuts member `index` off from the other members, both ways: every peer connection dialed
    /// to it and every one it dialed to the others is blackholed. Its clients still reach it
    /// (it then has no leader: etcd answers linearizable requests with errors or not at all).
    /// Needs [`EtcdCluster::start_with_peer_proxies`].
    pub fn partition(&self, index: usize) -> Result<(), Error> {
        self.set_partition(index, Some(Mode::Blackhole))
    }

    /// Undoes [`EtcdCluster::partition`]: the held traffic flows again.
    pub fn heal(&self, index: usize) -> Result<(), Error> {
        self.set_partition(index, None)
    }

    fn set_partition(&self, index: usize, mode: Option<Mode>) -> Result<(), Error> {
        if self.peer_proxies.len() != self.members.len() {
            return Err(Error::Cluster {
                what: "etcd",
                detail: "partition() needs a cluster started with start_with_peer_proxies()".into(),
            });
        }
        let id = &self.member_ids[index];
        for (j, proxy) in self.peer_proxies.iter().enumerate() {
            if j == index {
                proxy.set_mode(mode.unwrap_or_default());
            } else {
                proxy.set_tag_mode(id, mode);
            }
        }
        Ok(())
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

/// The member id in the `X-Server-From` header of a peer request (etcd's rafthttp names the
/// sending member there on every stream and message it opens), so that a peer proxy can tell
/// which member dialed a connection.
fn peer_sender(first_bytes: &[u8]) -> Option<String> {
    let head = String::from_utf8_lossy(first_bytes);
    head.lines()
        .take_while(|line| !line.is_empty())
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("x-server-from")
                .then(|| value.trim().to_ascii_lowercase())
        })
}

/// A member id as `/v3/maintenance/status` reports it (decimal, in JSON) written as rafthttp
/// writes it in headers (hexadecimal).
fn header_id(status_id: &str) -> String {
    status_id
        .parse::<u64>()
        .map_or_else(|_| status_id.to_ascii_lowercase(), |id| format!("{id:x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sender_of_a_peer_request_is_read_from_its_header() {
        let request = b"GET /raft/stream/msgappv2/8e9e05c52164694d HTTP/1.1\r\nHost: x\r\n\
                        X-Server-From: 8E9E05C52164694D\r\nX-Raft-To: 1\r\n\r\n";
        assert_eq!(peer_sender(request).as_deref(), Some("8e9e05c52164694d"));
        assert_eq!(
            peer_sender(b"GET / HTTP/1.1\r\n\r\nX-Server-From: 1\r\n"),
            None
        );
        assert_eq!(header_id("10276657743932975437"), "8e9e05c52164694d");
    }
}
