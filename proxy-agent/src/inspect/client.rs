//! The command line's side of `list` and `trace`: asking the running
//! agent's debug endpoints (it knows the desired table), and what the
//! command needs when the agent does not answer.
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

/// Why the agent gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// Nothing answers there (the agent is down, or serves elsewhere).
    #[error("no agent answers at {addr}: {source}")]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// It answered with an error.
    #[error("the agent at {addr} answered {status}: {body}")]
    Refused {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("the agent at {addr} sent a malformed answer: {why}")]
    Malformed { addr: SocketAddr, why: String },
}

/// GETs `path` (with its query) from the agent's metrics server at `addr`
/// and returns the body of a 200 answer.
pub fn ask(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, AskError> {
    let unreachable = |source| AskError::Unreachable { addr, source };
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    // HTTP/1.0: the server closes after the answer, which ends the read.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(unreachable)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(unreachable)?;
    let text = String::from_utf8_lossy(&raw);
    let malformed = |why: &str| AskError::Malformed {
        addr,
        why: why.into(),
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| malformed("no end of headers"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| malformed("no status code"))?;
    if status != 200 {
        return Err(AskError::Refused {
            addr,
            status,
            body: body.trim().to_string(),
        });
    }
    Ok(body.to_string())
}

/// The node's addresses (every interface's but loopback's and IPv6
/// link-local ones): where IPVS serves NodePorts, for reading its state
/// without the agent.
pub fn local_addresses() -> BTreeSet<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return BTreeSet::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback(),
            IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_that_is_not_there_is_unreachable_not_an_error_of_its_own() {
        // A port bound and closed at once: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let err = ask(addr, "/debug/services", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, AskError::Unreachable { .. }), "{err}");
    }
}
