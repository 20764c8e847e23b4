//! A TCP proxy between a client and a server that injects the faults a network makes:
//! partitions, one-way links, slow links and resets.

use crate::Error;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Which way bytes travel through a [`FaultProxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client to the server (requests).
    ToUpstream,
    /// From the server back to the client (answers).
    ToClient,
}

/// What a [`FaultProxy`] does to the traffic through it. Every connection, new or existing,
/// obeys the current mode from the next byte on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Forward everything at once.
    #[default]
    Pass,
    /// A partition: connections are accepted and kept open, but no byte goes through in either
    /// direction, and nobody is told (no FIN, no RST), as when a link or a switch dies.
    Blackhole,
    /// A slow link: every chunk is delivered this long after the proxy received it, in each
    /// direction (so a request and its answer take at least twice this).
    Latency(Duration),
    /// Every open connection is closed with a TCP RST (both sides see "connection reset"), and
    /// every new one is reset as soon as it is accepted.
    Reset,
    /// Bytes flow only in this direction; the other is held as in [`Mode::Blackhole`]. With
    /// `OneWay(Direction::ToUpstream)` a server applies requests whose answers never arrive.
    OneWay(Direction),
}

impl Mode {
    /// Whether a chunk travelling `direction` may go now (`Some(Duration::ZERO)`), after a
    /// delay (`Some(d)`), or not until the mode changes (`None`).
    fn delay(self, direction: Direction) -> Option<Duration> {
        match self {
            Mode::Pass => Some(Duration::ZERO),
            Mode::Latency(d) => Some(d),
            Mode::OneWay(open) if open == direction => Some(Duration::ZERO),
            Mode::OneWay(_) | Mode::Blackhole | Mode::Reset => None,
        }
    }
}

/// What went through a [`FaultProxy`] since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyStats {
    /// Connections accepted from clients (reset ones included).
    pub connections_accepted: u64,
    /// Connections open right now.
    pub connections_open: u64,
    /// Connections closed with an RST by [`Mode::Reset`] (at once, or while open).
    pub connections_reset: u64,
    /// Bytes forwarded to the server (counted as the proxy starts writing them).
    pub bytes_to_upstream: u64,
    /// Bytes forwarded back to clients (counted as the proxy starts writing them).
    pub bytes_to_client: u64,
}

/// Names the connection from its first bytes (client to server), so that one kind of
/// connection can get a mode of its own (see [`Faults::by_tag`]).
pub(crate) type Classifier = fn(&[u8]) -> Option<String>;

/// The modes in force: one for every connection, and overrides for tagged connections.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults {
    default: Mode,
    by_tag: Vec<(String, Mode)>,
}

impl Faults {
    fn mode_for(&self, tag: Option<&String>) -> Mode {
        tag.and_then(|tag| self.by_tag.iter().find(|(t, _)| t == tag))
            .map_or(self.default, |(_, mode)| *mode)
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
    reset: AtomicU64,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
}

impl Counters {
    fn bytes(&self, direction: Direction) -> &AtomicU64 {
        match direction {
            Direction::ToUpstream => &self.to_upstream,
            Direction::ToClient => &self.to_client,
        }
    }
}

struct Shared {
    upstream: SocketAddr,
    faults: watch::Sender<Faults>,
    counters: Counters,
    classify: Option<Classifier>,
}

/// A TCP proxy on a free port of 127.0.0.1 that forwards to one server and injects faults that
/// a test switches at any time: a partition ([`FaultProxy::blackhole`]), a one-way link, a slow
/// link, and resets. Point one client at [`FaultProxy::addr`] and the others at the server
/// itself, and only that client is cut off.
///
/// ```no_run
/// use palisade_testkit::{Direction, Etcd};
/// use std::time::Duration;
///
/// # fn main() -> Result<(), palisade_testkit::Error> {
/// let etcd = Etcd::start()?;
/// let proxy = etcd.proxy()?; // a client connects to format!("http://{}", proxy.addr())
/// proxy.blackhole();         // its requests now hang without an error
/// proxy.latency(Duration::from_millis(50));
/// proxy.one_way(Direction::ToUpstream); // requests arrive, answers do not
/// proxy.reset();             // every connection gets an RST, new ones too
/// proxy.pass();              // held bytes are delivered, in order
/// println!("{:?}", proxy.stats());
/// # Ok(()) }
/// ```
///
/// Bytes that a mode holds back are kept, not dropped, and delivered in order once the mode lets
/// them through, as TCP's retransmissions deliver them after a partition heals. The proxy runs on
/// a thread of its own (with its own tokio runtime), so it works the same from a plain `#[test]`,
/// a tokio test, or one with paused time. Dropping it closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("mode", &self.mode())
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on a free port of 127.0.0.1, in [`Mode::Pass`].
    pub fn start(upstream: SocketAddr) -> Result<FaultProxy, Error> {
        FaultProxy::start_classified(upstream, None)
    }

    pub(crate) fn start_classified(
        upstream: SocketAddr,
        classify: Option<Classifier>,
    ) -> Result<FaultProxy, Error> {
        let shared = Arc::new(Shared {
            upstream,
            faults: watch::Sender::new(Faults::default()),
            counters: Counters::default(),
            classify,
        });
        // Everything runs on the proxy's own thread: a runtime cannot be started (nor its
        // listener bound through it) from inside a test's own tokio runtime.
        let (bound, address) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel();
        let accepting = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("palisade-fault-proxy-{}", upstream.port()))
            .spawn(move || {
                let started = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(Error::io("starting the fault proxy's runtime"))
                    .and_then(|runtime| {
                        let listener = runtime
                            .block_on(async { TcpListener::bind("127.0.0.1:0").await })
                            .and_then(|l| l.local_addr().map(|addr| (l, addr)))
                            .map_err(Error::io(
                                "binding the fault proxy to a free loopback port",
                            ))?;
                        Ok((runtime, listener))
                    });
                match started {
                    Ok((runtime, (listener, addr))) => {
                        let _ = bound.send(Ok(addr));
                        runtime.block_on(accept_until(listener, accepting, stopped));
                        // Dropping the runtime drops every connection's task, closing its sockets.
                    }
                    Err(e) => {
                        let _ = bound.send(Err(e));
                    }
                }
            })
            .map_err(Error::io("starting the fault proxy's thread"))?;
        let addr = address.recv().map_err(|_| Error::Io {
            context: "starting the fault proxy".into(),
            source: std::io::Error::other("its thread ended before binding a port"),
        })??;
        Ok(FaultProxy {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address clients connect to instead of the server's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The mode in force for connections that have no mode of their own.
    pub fn mode(&self) -> Mode {
        self.shared.faults.borrow().default
    }

    /// Switches every connection, open and new, to `mode`.
    pub fn set_mode(&self, mode: Mode) {
        self.shared
            .faults
            .send_modify(|faults| faults.default = mode);
    }

    /// Forwards everything again ([`Mode::Pass`]).
    pub fn pass(&self) {
        self.set_mode(Mode::Pass);
    }

    /// Partitions the client from the server ([`Mode::Blackhole`]).
    pub fn blackhole(&self) {
        self.set_mode(Mode::Blackhole);
    }

    /// Delays each direction by `delay` ([`Mode::Latency`]).
    pub fn latency(&self, delay: Duration) {
        self.set_mode(Mode::Latency(delay));
    }

    /// Resets every connection and refuses new ones ([`Mode::Reset`]).
    pub fn reset(&self) {
        self.set_mode(Mode::Reset);
    }

    /// Lets bytes flow only in `direction` ([`Mode::OneWay`]).
    pub fn one_way(&self, direction: Direction) {
        self.set_mode(Mode::OneWay(direction));
    }

    /// Gives the connections whose classifier tag is `tag` a mode of their own (`None`: the
    /// proxy's mode again).
    pub(crate) fn set_tag_mode(&self, tag: &str, mode: Option<Mode>) {
        self.shared.faults.send_modify(|faults| {
            faults.by_tag.retain(|(t, _)| t != tag);
            if let Some(mode) = mode {
                faults.by_tag.push((tag.to_string(), mode));
            }
        });
    }

    /// Connections and bytes so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            connections_open: c.open.load(Ordering::Relaxed),
            connections_reset: c.reset.load(Ordering::Relaxed),
            bytes_to_upstream: c.to_upstream.load(Ordering::Relaxed),
            bytes_to_client: c.to_client.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_until(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(client, Arc::clone(&shared)));
            }
        }
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection<'a>(&'a Counters);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let counters = &shared.counters;
    counters.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenConnection(counters);
    if shared.faults.borrow().default == Mode::Reset {
        counters.reset.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_zero_linger();
        return;
    }
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        // The server is down: the client sees what it would see without the proxy, a reset.
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let tag = OnceLock::new();
    let reset = {
        let mut faults = shared.faults.subscribe();
        let tag = &tag;
        async move {
            let _ = faults
                .wait_for(|f| f.mode_for(tag.get()) == Mode::Reset)
                .await;
        }
    };
    let forward = async {
        tokio::try_join!(
            pump(
                &mut client_read,
                &mut server_write,
                Direction::ToUpstream,
                &shared,
                &tag
            ),
            pump(
                &mut server_read,
                &mut client_write,
                Direction::ToClient,
                &shared,
                &tag
            ),
        )
    };
    let was_reset = tokio::select! {
        _ = forward => false,
        _ = reset => true,
    };
    if was_reset {
        counters.reset.fetch_add(1, Ordering::Relaxed);
        // Closing a socket with SO_LINGER 0 sends an RST instead of a FIN. A dropped write half
        // would shut its direction down first (a FIN, which the peer reads as an orderly end
        // before the RST arrives), so the write halves are forgotten: the sockets close once,
        // when the read halves drop.
        let _ = client_read.as_ref().set_zero_linger();
        let _ = server_read.as_ref().set_zero_linger();
        client_write.forget();
        server_write.forget();
    }
}

/// Copies `from` to `to` as the mode allows: one future reads (so that a delay does not cap the
/// throughput), the other delivers each chunk when its time has come. Ends when `from` ends
/// (after passing the FIN on) or either side fails.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    direction: Direction,
    shared: &Shared,
    tag: &OnceLock<String>,
) -> std::io::Result<()> {
    let (chunks, mut arrived) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let read = async move {
        let mut first = true;
        loop {
            let mut buf = vec![0u8; 16 * 1024];
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(n);
            if first
                && direction == Direction::ToUpstream
                && let Some(name) = shared.classify.and_then(|classify| classify(&buf))
            {
                let _ = tag.set(name);
            }
            first = false;
            if chunks.send((Instant::now(), buf)).await.is_err() {
                return Ok(());
            }
        }
    };
    let deliver = async {
        let mut faults = shared.faults.subscribe();
        while let Some((received, chunk)) = arrived.recv().await {
            wait_until_open(&mut faults, direction, tag, received).await?;
            // Counted before the write: once the peer has read these bytes, the counter shows
            // them (a test compares it with what its client already received).
            shared
                .counters
                .bytes(direction)
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, deliver).map(|_| ())
}

/// Waits until a chunk received at `received` may be delivered under the current mode, following
/// every change of mode while it waits.
async fn wait_until_open(
    faults: &mut watch::Receiver<Faults>,
    direction: Direction,
    tag: &OnceLock<String>,
    received: Instant,
) -> std::io::Result<()> {
    let closed = || std::io::Error::other("the fault proxy is shutting down");
    loop {
        let mode = faults.borrow_and_update().mode_for(tag.get());
        match mode.delay(direction) {
            Some(delay) if Instant::now() >= received + delay => return Ok(()),
            Some(delay) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(received + delay) => return Ok(()),
                    changed = faults.changed() => changed.map_err(|_| closed())?,
                }
            }
            None => faults.changed().await.map_err(|_| closed())?,
        }
    }
}
