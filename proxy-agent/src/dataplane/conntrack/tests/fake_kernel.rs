//! The conversation, against a fake kernel behind [`Transport`].

use std::{cell::RefCell, collections::VecDeque, rc::Rc};

use super::*;

#[derive(Default)]
struct FakeState {
    entries: Vec<FakeEntry>,
    dumps: Vec<u8>,
    sends: usize,
    /// Entries per dump datagram.
    per_datagram: usize,
    dump_error: Option<i32>,
    delete_error: Option<i32>,
    /// The next dump stops with ENOBUFS after its first datagram.
    overrun_next_dump: bool,
    /// In the next delete batch, acks after this many are lost to an
    /// overrun (the deletes still happen).
    lose_acks_after: Option<usize>,
    /// Removed right after the dump (expired before the delete).
    expire_after_dump: Vec<u32>,
    /// Every dump lists every entry twice.
    duplicate: bool,
    /// A stray message with a foreign seq before every answer.
    stray: bool,
    /// Answer a dump filtered by protocol with EINVAL (a kernel that knows
    /// CTA_FILTER but not this use of it).
    refuse_filter: bool,
    /// For each dump, whether it asked for one protocol only.
    filtered: Vec<bool>,
}

struct FakeKernel {
    state: Rc<RefCell<FakeState>>,
    queue: VecDeque<Result<Vec<u8>, i32>>,
}

impl Transport for FakeKernel {
    fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        let mut st = self.state.borrow_mut();
        st.sends += 1;
        let mut acks = 0;
        for msg in messages(datagram) {
            let msg = msg.unwrap();
            let family = msg.payload[0];
            if st.stray {
                self.queue
                    .push_back(Ok(error_msg(msg.seq.wrapping_add(1000), -1)));
            }
            if msg.ty == ct_msg_type(IPCTNL_MSG_CT_GET) {
                assert_eq!(msg.flags, NLM_F_REQUEST | NLM_F_DUMP);
                st.dumps.push(family);
                // The request's protocol filter: the attributes after the
                // nfgenmsg, exactly as the agent sends them for UDP.
                let filter = &msg.payload[4..];
                let protocol = match filter {
                    [] => None,
                    _ => {
                        let mut want = Vec::new();
                        put_dump_request(&mut want, family, msg.seq, Some(IPPROTO_UDP)).unwrap();
                        assert_eq!(filter, &want[NLMSG_HDRLEN + 4..], "unexpected dump filter");
                        Some(IPPROTO_UDP)
                    }
                };
                st.filtered.push(protocol.is_some());
                if protocol.is_some() && st.refuse_filter {
                    self.queue.push_back(Ok(error_msg(msg.seq, -libc::EINVAL)));
                    continue;
                }
                if let Some(code) = st.dump_error {
                    self.queue.push_back(Ok(error_msg(msg.seq, code)));
                    continue;
                }
                let mut listed: Vec<&FakeEntry> = st
                    .entries
                    .iter()
                    .filter(|e| e.family == family)
                    .filter(|e| protocol.is_none_or(|p| e.orig.proto == p))
                    .collect();
                if st.duplicate {
                    listed.extend(listed.clone());
                }
                let mut datagrams: Vec<Vec<u8>> = listed
                    .chunks(st.per_datagram.max(1))
                    .map(|chunk| {
                        chunk
                            .iter()
                            .flat_map(|e| nlmsg(0x0101, 2, msg.seq, &entry_payload(e)))
                            .collect()
                    })
                    .collect();
                match datagrams.last_mut() {
                    Some(last) => last.extend(done_msg(msg.seq)),
                    None => datagrams.push(done_msg(msg.seq)),
                }
                if std::mem::take(&mut st.overrun_next_dump) {
                    datagrams.truncate(1);
                    self.queue.push_back(Ok(datagrams.remove(0)));
                    self.queue.push_back(Err(libc::ENOBUFS));
                } else {
                    self.queue.extend(datagrams.into_iter().map(Ok));
                }
                let expire = std::mem::take(&mut st.expire_after_dump);
                st.entries.retain(|e| !expire.contains(&e.id));
            } else if msg.ty == ct_msg_type(IPCTNL_MSG_CT_DELETE) {
                assert_eq!(msg.flags, NLM_F_REQUEST | NLM_F_ACK);
                let (mut orig, mut id) = (None, None);
                for a in attrs(&msg.payload[4..]) {
                    let a = a.unwrap();
                    match a.kind {
                        CTA_TUPLE_ORIG => orig = Some(parse_tuple(a.payload).unwrap()),
                        CTA_ID => id = Some(u32::from_be_bytes(a.payload.try_into().unwrap())),
                        _ => {}
                    }
                }
                let orig = orig.expect("a delete without a tuple flushes the table");
                let code = if let Some(code) = st.delete_error {
                    code
                } else if let Some(at) = st
                    .entries
                    .iter()
                    .position(|e| e.family == family && e.orig == orig && Some(e.id) == id)
                {
                    st.entries.remove(at);
                    0
                } else {
                    -libc::ENOENT
                };
                acks += 1;
                match st.lose_acks_after {
                    Some(n) if acks > n => {
                        if acks == n + 1 {
                            self.queue.push_back(Err(libc::ENOBUFS));
                        }
                    }
                    _ => self.queue.push_back(Ok(error_msg(msg.seq, code))),
                }
            } else {
                panic!("unexpected message type {:#x}", msg.ty);
            }
        }
        if acks > 0 {
            st.lose_acks_after = None;
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8], _wait: bool) -> io::Result<usize> {
        match self.queue.pop_front() {
            Some(Ok(d)) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(d.len())
            }
            Some(Err(code)) => Err(io::Error::from_raw_os_error(code)),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

fn run(state: &Rc<RefCell<FakeState>>, flows: &[StaleFlow]) -> Result<usize, ConntrackError> {
    cleanup(state, flows).map(|c| c.total_deleted())
}

fn cleanup(
    state: &Rc<RefCell<FakeState>>,
    flows: &[StaleFlow],
) -> Result<ConntrackCleanup, ConntrackError> {
    delete_with(
        || {
            Ok(FakeKernel {
                state: state.clone(),
                queue: VecDeque::new(),
            })
        },
        flows,
    )
}

const DNS: StaleFlow = StaleFlow {
    vip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
    port: 53,
    backend: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5)),
    backend_port: 5353,
};

/// `n` stale DNS flows (ids 1..=n), plus a live one to another backend
/// (id 1000) and an IPv6 flow (id 2000).
fn table(n: u32) -> Vec<FakeEntry> {
    let mut out: Vec<FakeEntry> = (1..=n)
        .map(|i| {
            dnat_entry(
                ("10.2.0.7", 10000 + i as u16),
                ("10.96.0.10", 53),
                ("10.1.0.5", 5353),
                i,
            )
        })
        .collect();
    out.push(dnat_entry(
        ("10.2.0.7", 9999),
        ("10.96.0.10", 53),
        ("10.1.0.6", 5353),
        1000,
    ));
    out.push(dnat_entry(
        ("fd00::7", 9999),
        ("fd00::10", 53),
        ("fd00::5", 5353),
        2000,
    ));
    out
}

fn fake(entries: Vec<FakeEntry>) -> Rc<RefCell<FakeState>> {
    Rc::new(RefCell::new(FakeState {
        entries,
        per_datagram: 7,
        ..FakeState::default()
    }))
}

fn ids(state: &Rc<RefCell<FakeState>>) -> Vec<u32> {
    state.borrow().entries.iter().map(|e| e.id).collect()
}

#[test]
fn deletes_matching_entries_over_a_multipart_dump_in_batches() {
    let state = fake(table(150));
    assert_eq!(run(&state, &[DNS]).unwrap(), 150);
    assert_eq!(ids(&state), [1000, 2000]);
    let st = state.borrow();
    assert_eq!(st.dumps, [AF_INET], "one dump, of the flows' family only");
    // One dump send, then 150 deletes in batches of 64.
    assert_eq!(st.sends, 1 + 150usize.div_ceil(DELETE_BATCH));
}

#[test]
fn one_dump_per_family_however_many_flows() {
    let state = fake(table(3));
    let v6 = stale_flow("fd00::10", 53, "fd00::5", 5353);
    let other = StaleFlow {
        backend: ip("10.1.0.6"),
        ..DNS
    };
    let done = cleanup(&state, &[DNS, other, v6, DNS]).unwrap();
    assert_eq!(done.deleted, [4, 1], "counted per family");
    assert!(done.took.iter().all(Option::is_some), "{done:?}");
    assert!(ids(&state).is_empty());
    assert_eq!(state.borrow().dumps, [AF_INET, AF_INET6]);
}

#[test]
fn a_family_without_flows_is_not_visited_nor_timed() {
    let state = fake(table(2));
    let done = cleanup(&state, &[DNS]).unwrap();
    assert_eq!(done.deleted, [2, 0]);
    assert!(done.took[0].is_some() && done.took[1].is_none(), "{done:?}");
}

/// An entry made before the Service existed: its reply comes from where
/// the client sent it.
fn untranslated_entry(client: (&str, u16), dst: (&str, u16), id: u32) -> FakeEntry {
    dnat_entry(client, dst, dst, id)
}

#[test]
fn untranslated_entries_go_for_the_frontend_and_the_node_port() {
    let state = fake(vec![
        untranslated_entry(("10.2.0.7", 4000), ("10.96.0.10", 53), 1),
        // Translated already: a live flow, stays.
        dnat_entry(("10.2.0.7", 4001), ("10.96.0.10", 53), ("10.1.0.5", 53), 2),
        // Another port of the address: stays.
        untranslated_entry(("10.2.0.7", 4002), ("10.96.0.10", 54), 3),
        // A node port, at two node addresses.
        untranslated_entry(("203.0.113.9", 4003), ("192.0.2.1", 30053), 4),
        untranslated_entry(("203.0.113.9", 4004), ("192.0.2.2", 30053), 5),
        // The node port translated: stays.
        dnat_entry(
            ("203.0.113.9", 4005),
            ("192.0.2.1", 30053),
            ("10.1.0.5", 53),
            6,
        ),
        // A reply from another port of the destination is no untranslated
        // entry of the node port.
        dnat_entry(
            ("203.0.113.9", 4006),
            ("192.0.2.1", 30053),
            ("192.0.2.1", 53),
            7,
        ),
    ]);
    let flows = [
        StaleFlow::untranslated(ip("10.96.0.10"), 53),
        StaleFlow::untranslated(ip("0.0.0.0"), 30053),
    ];
    assert_eq!(run(&state, &flows).unwrap(), 3);
    assert_eq!(ids(&state), [2, 3, 6, 7]);
}

#[test]
fn no_flows_no_netlink() {
    let state = fake(table(3));
    assert_eq!(run(&state, &[]).unwrap(), 0);
    assert_eq!(state.borrow().sends, 0);
}

#[test]
fn nothing_matching_sends_no_delete() {
    let state = fake(table(3));
    let flow = StaleFlow { port: 54, ..DNS };
    assert_eq!(run(&state, &[flow]).unwrap(), 0);
    assert_eq!(state.borrow().sends, 1);
    assert_eq!(ids(&state).len(), 5);
}

#[test]
fn entries_gone_before_the_delete_are_not_errors_nor_counted() {
    let state = fake(table(5));
    state.borrow_mut().expire_after_dump = vec![2, 4];
    assert_eq!(run(&state, &[DNS]).unwrap(), 3);
    assert_eq!(ids(&state), [1000, 2000]);
}

#[test]
fn duplicates_in_the_dump_are_deleted_once() {
    let state = fake(table(4));
    state.borrow_mut().duplicate = true;
    assert_eq!(run(&state, &[DNS]).unwrap(), 4);
    assert_eq!(state.borrow().sends, 2);
}

#[test]
fn foreign_messages_are_ignored() {
    let state = fake(table(4));
    state.borrow_mut().stray = true;
    assert_eq!(run(&state, &[DNS]).unwrap(), 4);
}

#[test]
fn a_refused_dump_is_a_kernel_error_and_deletes_nothing() {
    let state = fake(table(4));
    state.borrow_mut().dump_error = Some(-libc::EPERM);
    let err = run(&state, &[DNS]).unwrap_err();
    assert!(
        matches!(&err, ConntrackError::Kernel { request: "dump", source } if source.raw_os_error() == Some(libc::EPERM)),
        "{err:?}"
    );
    assert_eq!(ids(&state).len(), 6);
}

#[test]
fn the_kernel_filters_the_dump_by_protocol_or_sends_all_when_it_refuses() {
    let mut entries = table(3);
    // A TCP entry to the stale backend: never deleted, and never sent by
    // a kernel that filters.
    let mut tcp = dnat_entry(
        ("10.2.0.7", 8888),
        ("10.96.0.10", 53),
        ("10.1.0.5", 5353),
        3000,
    );
    tcp.orig.proto = libc::IPPROTO_TCP as u8;
    tcp.reply.proto = libc::IPPROTO_TCP as u8;
    entries.push(tcp);
    let state = fake(entries.clone());
    assert_eq!(run(&state, &[DNS]).unwrap(), 3);
    assert_eq!(ids(&state), [1000, 2000, 3000]);
    assert_eq!(state.borrow().filtered, [true]);

    let state = fake(entries);
    state.borrow_mut().refuse_filter = true;
    assert_eq!(run(&state, &[DNS]).unwrap(), 3);
    assert_eq!(ids(&state), [1000, 2000, 3000]);
    assert_eq!(state.borrow().filtered, [true, false]);
}

#[test]
fn an_overrun_dump_is_started_over() {
    let state = fake(table(30));
    state.borrow_mut().overrun_next_dump = true;
    assert_eq!(run(&state, &[DNS]).unwrap(), 30);
    assert_eq!(state.borrow().dumps, [AF_INET, AF_INET]);
    assert_eq!(ids(&state), [1000, 2000]);
}

#[test]
fn lost_acks_are_recovered() {
    let state = fake(table(40));
    state.borrow_mut().lose_acks_after = Some(10);
    assert_eq!(run(&state, &[DNS]).unwrap(), 40);
    assert_eq!(ids(&state), [1000, 2000]);
    // The batch, then the 30 unacknowledged requests one by one.
    assert_eq!(state.borrow().sends, 1 + 1 + 30);
}

#[test]
fn refused_deletes_are_reported_with_counts() {
    let state = fake(table(3));
    state.borrow_mut().delete_error = Some(-libc::EPERM);
    match run(&state, &[DNS]).unwrap_err() {
        ConntrackError::DeleteFailed {
            deleted,
            failed,
            first,
        } => {
            assert_eq!((deleted, failed), (0, 3));
            assert_eq!(first.raw_os_error(), Some(libc::EPERM));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_silent_kernel_is_a_timeout() {
    struct Mute;
    impl Transport for Mute {
        fn send(&mut self, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
        fn recv(&mut self, _: &mut [u8], _: bool) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
    let err = delete_with(|| Ok(Mute), &[DNS]).unwrap_err();
    assert!(matches!(err, ConntrackError::Timeout { .. }), "{err:?}");
}
