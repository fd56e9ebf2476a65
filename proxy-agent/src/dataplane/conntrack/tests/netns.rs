//! The real kernel, in a network namespace of its own.

use std::{
    net::{SocketAddr, UdpSocket},
    process::{Command, Stdio},
};

use super::*;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Runs a command (in the calling thread's network namespace, which a
/// child spawned from it inherits), feeding it `stdin`. Returns stdout,
/// or what went wrong.
fn try_sh(cmd: &[&str], stdin: &str) -> Result<String, String> {
    use std::io::Write;
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let mut input = child.stdin.take().ok_or("no stdin")?;
    input
        .write_all(stdin.as_bytes())
        .map_err(|e| e.to_string())?;
    drop(input);
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| e.to_string())
}

fn sh(cmd: &[&str], stdin: &str) -> String {
    try_sh(cmd, stdin).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends one datagram to `to` from a fresh socket bound to `from`. The
/// socket is returned to keep its port from being reused by the next.
fn send_from(from: &str, to: &str) -> (UdpSocket, u16) {
    let socket = UdpSocket::bind(from).unwrap();
    socket.send_to(b"ping", to).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

fn sorted(mut ports: Vec<u16>) -> Vec<u16> {
    ports.sort_unstable();
    ports
}

/// Receives `n` datagrams; returns their source ports.
fn receive(socket: &UdpSocket, n: usize) -> Vec<u16> {
    let mut buf = [0; 16];
    (0..n)
        .map(|_| {
            let (_, from): (usize, SocketAddr) =
                socket.recv_from(&mut buf).expect("datagram within 1s");
            from.port()
        })
        .collect()
}

/// The UDP conntrack entries of `family` ("ipv4"/"ipv6"), one a line.
fn listed(family: &str) -> String {
    sh(&["conntrack", "-L", "-f", family, "-p", "udp"], "")
}

fn lists(listing: &str, sport: u16, dport: u16) -> bool {
    let needle = format!("sport={sport} dport={dport} ");
    listing.lines().any(|l| l.contains(&needle))
}

/// In a network namespace of its own (needs root; the namespace lives
/// and dies with the test's thread, so nothing outlives a failure):
/// DNATed UDP flows are tracked by the kernel, the stale ones are
/// deleted and counted, the others stay.
#[test]
fn deletes_stale_flows_from_the_kernel_table() {
    if !have("ip") || !have("nft") || !have("conntrack") {
        eprintln!("skipping: needs ip, nft and conntrack on PATH");
        return;
    }
    crate::dataplane::in_private_netns(in_namespace);
}

fn in_namespace() {
    sh(&["ip", "link", "set", "lo", "up"], "");
    sh(
        &["nft", "-f", "-"],
        "table ip ct_test {
            chain out {
                type nat hook output priority -100;
                udp dport 5555 dnat to 127.0.0.1:6666
                udp dport 5556 dnat to 127.0.0.1:6666
            }
        }",
    );
    let v4_backend = UdpSocket::bind("127.0.0.1:6666").unwrap();
    let untouched = UdpSocket::bind("127.0.0.1:7777").unwrap();
    for s in [&v4_backend, &untouched] {
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    }
    // IPv6 too, where the namespace has it: [::1]:5555 → [::1]:6666.
    let v6_backend = match UdpSocket::bind("[::1]:6666")
        .map_err(|e| e.to_string())
        .and_then(|s| {
            try_sh(
                &["nft", "-f", "-"],
                "table ip6 ct_test6 {
                    chain out {
                        type nat hook output priority -100;
                        udp dport 5555 dnat to [::1]:6666
                    }
                }",
            )
            .map(|_| s)
        }) {
        Ok(socket) => Some(socket),
        Err(e) => {
            eprintln!("no IPv6 NAT in the namespace ({e}): testing IPv4 only");
            None
        }
    };

    let mut keep = Vec::new();
    let mut send = |from, to| {
        let (socket, port) = send_from(from, to);
        keep.push(socket);
        port
    };
    let stale: Vec<u16> = (0..3)
        .map(|_| send("127.0.0.1:0", "127.0.0.2:5555"))
        .collect();
    let other_port = send("127.0.0.1:0", "127.0.0.2:5556");
    let not_nated = send("127.0.0.1:0", "127.0.0.1:7777");
    assert_eq!(
        sorted(receive(&v4_backend, 4)),
        sorted([stale.clone(), vec![other_port]].concat()),
        "DNAT to 127.0.0.1:6666 works"
    );
    assert_eq!(receive(&untouched, 1), [not_nated]);
    let stale6: Vec<u16> = match &v6_backend {
        Some(socket) => {
            socket
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            let ports: Vec<u16> = (0..2).map(|_| send("[::1]:0", "[::1]:5555")).collect();
            assert_eq!(sorted(receive(socket, 2)), sorted(ports.clone()));
            ports
        }
        None => Vec::new(),
    };

    let before = listed("ipv4");
    for &p in &stale {
        assert!(lists(&before, p, 5555), "tracked before: {before}");
    }
    assert!(
        lists(&before, other_port, 5556) && lists(&before, not_nated, 7777),
        "{before}"
    );
    if !stale6.is_empty() {
        let before6 = listed("ipv6");
        assert!(
            stale6.iter().all(|&p| lists(&before6, p, 5555)),
            "{before6}"
        );
    }

    let flow = stale_flow("127.0.0.2", 5555, "127.0.0.1", 6666);
    let flow6 = stale_flow("::1", 5555, "::1", 6666);
    let deleted = delete_stale_udp_flows(&[flow, flow6]).unwrap();
    assert_eq!(deleted.deleted, [stale.len(), stale6.len()]);

    let after = listed("ipv4");
    for &p in &stale {
        assert!(!lists(&after, p, 5555), "deleted: {after}");
    }
    assert!(
        lists(&after, other_port, 5556),
        "another port stays: {after}"
    );
    assert!(
        lists(&after, not_nated, 7777),
        "an untranslated flow stays: {after}"
    );
    if !stale6.is_empty() {
        let after6 = listed("ipv6");
        assert!(!stale6.iter().any(|&p| lists(&after6, p, 5555)), "{after6}");
    }

    // Again: nothing left to delete.
    assert_eq!(
        delete_stale_udp_flows(&[flow, flow6])
            .unwrap()
            .total_deleted(),
        0
    );

    // NodePort form: any destination address, port 5556.
    let nodeport = StaleFlow {
        vip: ip("0.0.0.0"),
        port: 5556,
        ..flow
    };
    assert_eq!(delete_stale_udp_flows(&[nodeport]).unwrap().deleted, [1, 0]);
    let last = listed("ipv4");
    assert!(!lists(&last, other_port, 5556), "{last}");
    assert!(lists(&last, not_nated, 7777), "{last}");

    // The flow that was never translated, as a Service taking over
    // 127.0.0.1:7777 would forget it: in its node-port form, then exactly.
    let untranslated = StaleFlow::untranslated(ip("127.0.0.1"), 7777);
    let any_address = StaleFlow::untranslated(ip("0.0.0.0"), 7777);
    assert_eq!(
        delete_stale_udp_flows(&[StaleFlow::untranslated(ip("127.0.0.1"), 7778)])
            .unwrap()
            .total_deleted(),
        0,
        "another port"
    );
    assert_eq!(
        delete_stale_udp_flows(&[any_address]).unwrap().deleted,
        [1, 0]
    );
    assert!(!lists(&listed("ipv4"), not_nated, 7777));
    let again = send("127.0.0.1:0", "127.0.0.1:7777");
    assert_eq!(receive(&untouched, 1), [again]);
    assert_eq!(
        delete_stale_udp_flows(&[untranslated]).unwrap().deleted,
        [1, 0]
    );
    let kept = send("127.0.0.1:0", "127.0.0.1:7777");
    assert_eq!(receive(&untouched, 1), [kept]);

    // The kernel filters a dump by protocol: with a TCP flow tracked, the
    // UDP-only dump sends one entry fewer than the plain one.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let _tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let flows = FlowSet::by_family(&[flow]);
    let dumped = |filtered: bool| {
        let mut session = Session::new(NetlinkSocket::open().unwrap());
        session
            .dump(&flows[0], filtered, &mut BTreeSet::new())
            .unwrap();
        session.dumped
    };
    let (udp_only, all) = (dumped(true), dumped(false));
    assert!(udp_only >= 1, "the untranslated UDP flow is listed");
    assert_eq!(
        all,
        udp_only + 1,
        "the TCP flow is left out of the filtered dump"
    );
}

/// In a namespace of its own: a TCP connection DNATed by netfilter counts
/// while it is open and to a destination the predicate takes, and no
/// longer once it is closed; an untranslated one never counts.
#[test]
fn counts_open_translated_tcp_connections() {
    if !have("ip") || !have("nft") {
        eprintln!("skipping: needs ip and nft on PATH");
        return;
    }
    crate::dataplane::in_private_netns(|| {
        use std::net::{TcpListener, TcpStream};
        sh(&["ip", "link", "set", "lo", "up"], "");
        sh(
            &["nft", "-f", "-"],
            "table ip ct_tcp_test {
                chain out {
                    type nat hook output priority -100;
                    ip daddr 127.0.0.2 tcp dport 80 dnat to 127.0.0.1:8080
                }
            }",
        );
        let listener = TcpListener::bind("127.0.0.1:8080").unwrap();
        let frontend = |ip: IpAddr, port: u16| ip == IpAddr::from([127, 0, 0, 2]) && port == 80;
        let translated = TcpStream::connect("127.0.0.2:80").unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let direct = TcpStream::connect("127.0.0.1:8080").unwrap();
        let (accepted_direct, _) = listener.accept().unwrap();
        assert_eq!(count_translated_tcp_flows(frontend).unwrap(), 1);
        assert_eq!(
            count_translated_tcp_flows(|_, _| false).unwrap(),
            0,
            "the predicate decides"
        );
        drop((translated, accepted));
        drop((direct, accepted_direct));
        // Closed: TIME_WAIT (or CLOSE) in conntrack, over.
        let closed = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            count_translated_tcp_flows(frontend).unwrap() == 0
        });
        assert!(closed, "a closed connection still counts");
    });
}
