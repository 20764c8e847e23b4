//! Free loopback ports and the tiny amount of HTTP and RESP the readiness probes need.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// A port on 127.0.0.1 that was free a moment ago (the OS picks it).
pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A free port `p` such that `p + offset` is free too (Redis Cluster's bus is at port + 10000).
pub(crate) fn free_port_pair(offset: u16) -> std::io::Result<u16> {
    for _ in 0..200 {
        let port = free_port()?;
        let Some(other) = port.checked_add(offset) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", other)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free pair of loopback ports found",
    ))
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    Ok(stream)
}

/// Sends one HTTP/1.1 request and returns (status, body). Handles chunked bodies.
pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = connect(addr)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || tail.len() < size {
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    out
}

/// Sends one inline Redis command and returns what the server answered (the raw RESP text).
pub(crate) fn resp(addr: SocketAddr, command: &str) -> std::io::Result<String> {
    let mut stream = connect(addr)?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if resp_complete(&out) {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Whether `raw` holds one whole simple, error, integer or bulk reply.
fn resp_complete(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some((first, rest)) = text.split_once("\r\n") else {
        return false;
    };
    match first.as_bytes().first() {
        Some(b'$') => first[1..]
            .parse::<i64>()
            .map(|len| len < 0 || rest.len() >= len as usize + 2)
            .unwrap_or(true),
        _ => true,
    }
}
