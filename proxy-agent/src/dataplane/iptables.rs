//! The iptables dataplane: `iptables-restore` / `ip6tables-restore` input
//! in kube-proxy's chain layout, so that operators' habits (`iptables-save
//! | grep KUBE-SVC`, the comments, the masquerade bit) keep working. What
//! each frontend means is decided in [`super::netfilter`]; this module only
//! spells it in iptables.
//!
//! Layout, per family (`iptables` for IPv4, `ip6tables` for IPv6):
//! - nat `KUBE-SERVICES`, jumped to from `PREROUTING` and `OUTPUT`: one rule
//!   per frontend address (`-d vip -p proto --dport port`), to `KUBE-SVC-…`
//!   (ClusterIP), `KUBE-EXT-…` (externalIPs, LoadBalancer IPs) or
//!   `KUBE-FW-…` (LoadBalancer IPs with source ranges); last, one
//!   `-d <address> -j KUBE-NODEPORTS` per NodePort address of the node
//!   (never `--dst-type LOCAL`: loopback is served only when asked for,
//!   CVE-2020-8558).
//! - nat `KUBE-NODEPORTS`: `-p proto --dport nodePort -j KUBE-EXT-…`.
//! - `KUBE-FW-<hash>`: `-s <range> -j KUBE-EXT-…` per source range; other
//!   sources fall through untranslated and are dropped by the filter
//!   table's `KUBE-PROXY-FIREWALL`.
//! - `KUBE-EXT-<hash>`: the pods' short-circuit of a frontend whose policy
//!   is Local (`-s <cluster CIDR> -j KUBE-SVC-…`), the masquerade mark, then
//!   the endpoint choice of the frontend's own view (`KUBE-SVL-…` when the
//!   pods have a view of their own, as kube-proxy names local endpoints).
//! - `KUBE-SVC-<hash>` / `KUBE-SVL-<hash>`: the masquerade mark of a
//!   ClusterIP, the session affinity checks (`-m recent --rcheck`), then the
//!   `-m statistic --mode random --probability 1/(n-i)` cascade to the
//!   `KUBE-SEP-…` chains, the last one unconditional.
//! - `KUBE-SEP-<hash>`: one endpoint of one frontend: hairpin (`-s <ep> -j
//!   KUBE-MARK-MASQ`), then `-j DNAT` (with `-m recent --set` under
//!   affinity; the recent list is named like the chain).
//! - nat `KUBE-MARK-MASQ` sets the mark 0x4000, `KUBE-POSTROUTING` (from
//!   `POSTROUTING`) masquerades marked packets (`--random-fully`).
//!
//! The nat table cannot drop or reject. As in kube-proxy, a view that
//! rejects or drops is simply not translated, and the filter table catches
//! the packets still addressed to the frontend: `KUBE-SERVICES` (rejects of
//! ClusterIPs, externalIPs, LoadBalancer IPs; drops of ClusterIPs with the
//! Local internal policy), `KUBE-EXTERNAL-SERVICES` (rejects of NodePorts,
//! drops of external frontends without a local endpoint, for non-pods only
//! when the pods have a view) and `KUBE-PROXY-FIREWALL` (sources outside
//! the source ranges), each jumped to from `INPUT`, `FORWARD` and `OUTPUT`
//! for `--ctstate NEW`, the firewall first, so a source outside the ranges
//! is dropped before a reject, as the nftables mode orders it. (kube-proxy
//! hooks `KUBE-SERVICES` from FORWARD and OUTPUT only and
//! `KUBE-EXTERNAL-SERVICES` from INPUT and FORWARD; a VIP the node has a
//! local route for, or a node process reaching a NodePort, needs all three
//! for a drop to mean the same as in the nftables mode.)
//!
//! Chain names carry a hash of the frontend (and endpoint): 16 base32
//! characters of a 128-bit FNV-1a (see [`hash16`]), the same on every run
//! and version, since the kernel keeps the chains across restarts of the
//! agent; at most 25 characters, under iptables' limit of 28.
//!
//! A sync is at most one `iptables-restore --noflush` per family (nat and
//! filter in it), holding the chains of the changed frontends (only those
//! whose rules changed), the deletions (`-X`) of the chains they no longer
//! have, and the top-level chains (`KUBE-SERVICES`, `KUBE-NODEPORTS`, the
//! filter chains), rewritten whole. There is no chunking as in the nftables
//! mode: one restore is one atomic transaction per table, and its cost grows
//! linearly with its size (kube-proxy writes everything in one as well).
//! The jumps from the built-in chains are checked (against `iptables-save`)
//! at start and by every reconcile, never by a partial sync. The reconcile
//! rewrites every chain of ours and deletes the per-frontend chains (by
//! prefix, so kube-proxy's too) that no frontend wants. `-w 5` waits for
//! the xtables lock; nothing else is locked.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    process::Command,
    time::Instant,
};

use ipnet::IpNet;

use super::{
    ApplyStats, Dataplane, DataplaneError, NodeNetwork, conntrack,
    netfilter::{
        self, Action, Family, FrontendPlan, MASQUERADE_MARK, Masquerade, View, comment_of,
        proto_name,
    },
};
use crate::model::{Backend, Frontend, FrontendKey, Protocol, ServiceTable, TableDiff};

/// nat: the services' entry point (also a filter chain of that name).
pub const SERVICES_CHAIN: &str = "KUBE-SERVICES";
/// nat: NodePorts, jumped to from the end of `KUBE-SERVICES`.
pub const NODEPORTS_CHAIN: &str = "KUBE-NODEPORTS";
const POSTROUTING_CHAIN: &str = "KUBE-POSTROUTING";
const MARK_MASQ_CHAIN: &str = "KUBE-MARK-MASQ";
/// filter: packets to external frontends that were not translated.
const EXTERNAL_SERVICES_CHAIN: &str = "KUBE-EXTERNAL-SERVICES";
/// filter: packets to LoadBalancer IPs from outside their source ranges.
const FIREWALL_CHAIN: &str = "KUBE-PROXY-FIREWALL";

/// Prefixes of the per-frontend chains (kube-proxy's too, `KUBE-XLB-` of
/// its older versions included): every chain of the nat table with one of
/// them is ours, wanted or not.
const FRONTEND_PREFIXES: [&str; 6] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-XLB-",
];

/// iptables' limit on chain names.
pub const MAX_CHAIN_NAME: usize = 28;

/// How long iptables-restore waits for the xtables lock (`-w`), seconds.
const LOCK_WAIT_SECS: &str = "5";

/// How many lines of iptables-restore's stderr an error keeps.
const STDERR_LINES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("running {binary}: {source}")]
    Spawn {
        binary: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} refused the input{}: {stderr}", line_text(*.line, .text))]
    Refused {
        binary: &'static str,
        /// Its first lines of stderr, joined with " | ".
        stderr: String,
        /// The input line it reported, if it did.
        line: Option<usize>,
        /// That line of our input.
        text: Option<String>,
    },
    #[error("{binary} failed: {stderr}")]
    Save {
        binary: &'static str,
        stderr: String,
    },
    #[error("deleting stale UDP flows: {0}")]
    Conntrack(#[from] conntrack::ConntrackError),
}

fn line_text(line: Option<usize>, text: &Option<String>) -> String {
    match (line, text) {
        (Some(n), Some(t)) => format!(" at line {n} ({t:?})"),
        (Some(n), None) => format!(" at line {n}"),
        _ => String::new(),
    }
}

// ---------------------------------------------------------------------------
// Running iptables.

/// Which of iptables' two kernel interfaces the mode writes through. A node
/// has one in use (kubelet's and the CNI's rules are there); rules in the
/// other would be evaluated too, in an order nobody chose, and hidden from
/// the operator's `iptables-save`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IptablesBackend {
    /// nf_tables (`iptables-nft-*`).
    #[default]
    Nft,
    /// The legacy xtables interface (`iptables-legacy-*`).
    Legacy,
}

impl IptablesBackend {
    pub const ALL: [IptablesBackend; 2] = [IptablesBackend::Nft, IptablesBackend::Legacy];

    pub fn name(self) -> &'static str {
        match self {
            IptablesBackend::Nft => "nft",
            IptablesBackend::Legacy => "legacy",
        }
    }

    /// Most chains one restore should declare. Only iptables-nft needs a
    /// limit ([`CHAINS_PER_RESTORE`]); the legacy backend replaces the whole
    /// table at each commit, so one restore is cheapest there.
    fn chains_per_restore(self) -> usize {
        match self {
            IptablesBackend::Nft => CHAINS_PER_RESTORE,
            IptablesBackend::Legacy => usize::MAX,
        }
    }

    fn restore_binary(self, family: Family) -> &'static str {
        match (self, family) {
            (IptablesBackend::Nft, Family::V4) => "iptables-nft-restore",
            (IptablesBackend::Nft, Family::V6) => "ip6tables-nft-restore",
            (IptablesBackend::Legacy, Family::V4) => "iptables-legacy-restore",
            (IptablesBackend::Legacy, Family::V6) => "ip6tables-legacy-restore",
        }
    }

    fn binary(self, family: Family) -> &'static str {
        match (self, family) {
            (IptablesBackend::Nft, Family::V4) => "iptables-nft",
            (IptablesBackend::Nft, Family::V6) => "ip6tables-nft",
            (IptablesBackend::Legacy, Family::V4) => "iptables-legacy",
            (IptablesBackend::Legacy, Family::V6) => "ip6tables-legacy",
        }
    }

    fn save_binary(self, family: Family) -> &'static str {
        match (self, family) {
            (IptablesBackend::Nft, Family::V4) => "iptables-nft-save",
            (IptablesBackend::Nft, Family::V6) => "ip6tables-nft-save",
            (IptablesBackend::Legacy, Family::V4) => "iptables-legacy-save",
            (IptablesBackend::Legacy, Family::V6) => "ip6tables-legacy-save",
        }
    }

    /// The backend the node uses, decided as Kubernetes' iptables wrapper
    /// does: the one holding kubelet's marker chains (`KUBE-IPTABLES-HINT`,
    /// `KUBE-KUBELET-CANARY`, in mangle), else the one holding more rules
    /// (nft on a tie), else the only one installed.
    pub fn detect() -> IptablesBackend {
        let saves = Self::ALL.map(|backend| {
            let texts: Vec<String> = [Family::V4, Family::V6]
                .into_iter()
                .filter_map(|family| Command::new(backend.save_binary(family)).output().ok())
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                .collect();
            // No binary of either family: not installed.
            (!texts.is_empty()).then(|| texts.concat())
        });
        Self::choose(&saves)
    }

    /// [`IptablesBackend::detect`]'s choice from what each backend's saves
    /// printed (in [`IptablesBackend::ALL`]'s order; `None`: not installed).
    fn choose(saves: &[Option<String>; 2]) -> IptablesBackend {
        let marked = |text: &str| {
            text.lines().any(|l| {
                l.starts_with(":KUBE-IPTABLES-HINT ") || l.starts_with(":KUBE-KUBELET-CANARY ")
            })
        };
        let rules = |text: &str| text.lines().filter(|l| l.starts_with("-A ")).count();
        match saves {
            [None, Some(_)] => IptablesBackend::Legacy,
            [Some(_), None] | [None, None] => IptablesBackend::Nft,
            [Some(nft), Some(legacy)] => {
                if marked(nft) {
                    IptablesBackend::Nft
                } else if marked(legacy) || rules(legacy) > rules(nft) {
                    IptablesBackend::Legacy
                } else {
                    IptablesBackend::Nft
                }
            }
        }
    }
}

/// Feeds `input` to `iptables-restore --noflush` of `family`.
fn restore(backend: IptablesBackend, family: Family, input: &str) -> Result<(), IptablesError> {
    let binary = backend.restore_binary(family);
    let spawn = |source| IptablesError::Spawn { binary, source };
    let out = netfilter::run_with_input(
        binary,
        &["-w", LOCK_WAIT_SECS, "--noflush"],
        input.as_bytes(),
    )
    .map_err(spawn)?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr);
    Err(refusal(binary, &text, input))
}

/// The error of a refused restore: the first lines of stderr, and the
/// offending input line when iptables-restore names one ("Error occurred at
/// line: N", or "line N failed").
fn refusal(binary: &'static str, stderr: &str, input: &str) -> IptablesError {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Try `"))
        .take(STDERR_LINES)
        .collect();
    let line = stderr.lines().find_map(|l| {
        let rest = l.split("line").nth(1)?;
        rest.trim_start_matches([':', ' '])
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<usize>()
            .ok()
    });
    let text = line
        .filter(|n| *n > 0)
        .and_then(|n| input.lines().nth(n - 1))
        .map(str::to_string);
    IptablesError::Refused {
        binary,
        stderr: if lines.is_empty() {
            "(no message)".to_string()
        } else {
            lines.join(" | ")
        },
        line,
        text,
    }
}

/// The first [`STDERR_LINES`] lines of a tool's stderr, joined with " | ".
fn first_lines(stderr: &str) -> String {
    stderr
        .lines()
        .take(STDERR_LINES)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// `iptables-save -t <table>` of `family`, parsed. A missing binary reads
/// as an empty table when `missing_is_empty` (cleanup on a node without
/// iptables).
fn save(
    backend: IptablesBackend,
    family: Family,
    table: &str,
    missing_is_empty: bool,
) -> Result<Saved, IptablesError> {
    let binary = backend.save_binary(family);
    let out = match Command::new(binary).args(["-t", table]).output() {
        Ok(out) => out,
        Err(e) if missing_is_empty && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Saved::default());
        }
        Err(source) => return Err(IptablesError::Spawn { binary, source }),
    };
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        // A table the kernel does not have is empty.
        if text.contains("does not exist") || text.contains("Table does not exist") {
            return Ok(Saved::default());
        }
        return Err(IptablesError::Save {
            binary,
            stderr: first_lines(&text),
        });
    }
    Ok(Saved::parse(&String::from_utf8_lossy(&out.stdout)))
}

/// The chains `chains` of `table` as `iptables -S <chain>` prints them,
/// parsed like a save; a chain the table lacks is absent. Listing one chain
/// costs milliseconds where iptables-nft-save of a large table costs
/// minutes (iptables 1.8.9 looks chains up by a linear search while it
/// saves: 20 s at 33 000 chains).
fn list_chains(
    backend: IptablesBackend,
    family: Family,
    table: &str,
    chains: &[&str],
) -> Result<Saved, IptablesError> {
    if backend == IptablesBackend::Legacy {
        // Legacy iptables reads the whole table for `-S` of one chain: one
        // save is cheaper than a listing per chain.
        let mut all = save(backend, family, table, false)?;
        all.chains.retain(|c, _| chains.contains(&c.as_str()));
        return Ok(all);
    }
    let binary = backend.binary(family);
    let mut saved = Saved::default();
    for chain in chains {
        let out = Command::new(binary)
            .args(["-w", LOCK_WAIT_SECS, "-t", table, "-S", chain])
            .output()
            .map_err(|source| IptablesError::Spawn { binary, source })?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr);
            if text.contains("No chain") || text.contains("does not exist") {
                continue;
            }
            return Err(IptablesError::Save {
                binary,
                stderr: first_lines(&text),
            });
        }
        let rules = saved.chains.entry(chain.to_string()).or_default();
        let prefix = format!("-A {chain} ");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(rule) = line.strip_prefix(&prefix) {
                rules.push(rule.to_string());
            }
        }
    }
    Ok(saved)
}

/// The chains a reconcile checks between full checks: the built-in ones our
/// jumps stand in, and ours that are not per frontend, by table.
const CHECKED_CHAINS: [(&str, &[&str]); 2] = [
    (
        "nat",
        &[
            "PREROUTING",
            "OUTPUT",
            "POSTROUTING",
            SERVICES_CHAIN,
            NODEPORTS_CHAIN,
            MARK_MASQ_CHAIN,
            POSTROUTING_CHAIN,
        ],
    ),
    (
        "filter",
        &[
            "INPUT",
            "FORWARD",
            "OUTPUT",
            SERVICES_CHAIN,
            EXTERNAL_SERVICES_CHAIN,
            FIREWALL_CHAIN,
        ],
    ),
];

/// One table as iptables-save prints it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Saved {
    /// Every chain (built-in ones included) and its rules, each the text
    /// after `-A <chain> `.
    chains: BTreeMap<String, Vec<String>>,
}

impl Saved {
    fn parse(text: &str) -> Saved {
        let mut saved = Saved::default();
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    saved.chains.entry(name.to_string()).or_default();
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
                saved
                    .chains
                    .entry(chain.to_string())
                    .or_default()
                    .push(spec.to_string());
            }
        }
        saved
    }

    fn has(&self, chain: &str) -> bool {
        self.chains.contains_key(chain)
    }

    fn rules(&self, chain: &str) -> &[String] {
        self.chains.get(chain).map_or(&[], Vec::as_slice)
    }
}

/// The jump target of a rule's text (`-j X` or `-g X`).
fn target_of(spec: &str) -> Option<&str> {
    let mut words = spec.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" || w == "--jump" || w == "--goto" {
            return words.next();
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Names.

/// 128-bit FNV-1a: short, stable across versions (it is written here, not
/// taken from a library that might change), and enough bits for chain
/// names that must not collide.
fn fnv1a_128(data: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut hash = OFFSET;
    for b in data {
        hash ^= u128::from(*b);
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// 16 characters of RFC 4648 base32 of the first 80 bits of the hash of
/// `text`. The hash's own 16 bytes are hashed once more: FNV-1a mixes its
/// last input bytes into few bits, and names of endpoints that differ in
/// one digit should not look alike.
fn hash16(text: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let once = fnv1a_128(text.as_bytes()).to_be_bytes();
    let bits = fnv1a_128(&once) >> 48;
    (0..16)
        .rev()
        .map(|i| char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]))
        .collect()
}

/// The text a frontend's names are hashed from. Changing it renames every
/// chain on upgrade: don't.
fn key_text(key: &FrontendKey) -> String {
    format!("{}/{}/{}", proto_name(key.protocol), key.ip, key.port)
}

fn frontend_hash(key: &FrontendKey) -> String {
    hash16(&key_text(key))
}

/// `KUBE-SVC-<hash>`: the choice among every endpoint of the frontend's
/// main view (or of the pods' view, when it has one).
pub fn svc_chain(key: &FrontendKey) -> String {
    format!("KUBE-SVC-{}", frontend_hash(key))
}

/// `KUBE-SVL-<hash>`: the choice among the local endpoints of a frontend
/// whose pods have a view of their own.
pub fn svl_chain(key: &FrontendKey) -> String {
    format!("KUBE-SVL-{}", frontend_hash(key))
}

/// `KUBE-EXT-<hash>`: the entry of an external frontend.
pub fn ext_chain(key: &FrontendKey) -> String {
    format!("KUBE-EXT-{}", frontend_hash(key))
}

/// `KUBE-FW-<hash>`: the source ranges of a LoadBalancer frontend.
pub fn fw_chain(key: &FrontendKey) -> String {
    format!("KUBE-FW-{}", frontend_hash(key))
}

/// `KUBE-SEP-<hash>`: one endpoint of one frontend.
pub fn sep_chain(key: &FrontendKey, backend: &Backend) -> String {
    let text = format!("{}>{}", key_text(key), addr_port(backend));
    format!("KUBE-SEP-{}", hash16(&text))
}

fn addr_port(backend: &Backend) -> String {
    match backend.ip {
        IpAddr::V4(ip) => format!("{ip}:{}", backend.port),
        IpAddr::V6(ip) => format!("[{ip}]:{}", backend.port),
    }
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

fn net(n: &IpNet) -> String {
    format!("{}/{}", n.network(), n.prefix_len())
}

/// `-m comment --comment "<text>"`, with what the restore parser cannot
/// take inside quotes left out (names are DNS labels; this is a guard).
fn comment(text: &str) -> String {
    let clean: String = text
        .chars()
        .filter(|c| !matches!(c, '"' | '\\' | '\n' | '\r'))
        .take(250)
        .collect();
    format!("-m comment --comment \"{clean}\"")
}

/// `-p proto -m proto --dport port`.
fn dport(key: &FrontendKey) -> String {
    let p = proto_name(key.protocol);
    format!("-p {p} -m {p} --dport {}", key.port)
}

/// kube-proxy's spelling of the cascade's probabilities.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

// ---------------------------------------------------------------------------
// What a frontend is in iptables.

/// The nat chains of one frontend, and the rule that enters them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rendered {
    /// Chain name and its rules (the text after `-A <chain> `), in order.
    chains: BTreeMap<String, Vec<String>>,
    /// The rule of `KUBE-SERVICES` (or of `KUBE-NODEPORTS`, for a NodePort)
    /// that enters the frontend; `None` when nothing is translated.
    entry: Option<String>,
}

fn balances(view: &View) -> bool {
    matches!(view.action, Action::Balance(_))
}

/// The nat chains of `plan`; `external`: the frontend is reached from
/// outside the cluster (its kind is not ClusterIP) and enters through
/// `KUBE-EXT-…`.
fn render(plan: &FrontendPlan, comment_text: &str, external: bool) -> Rendered {
    let mut out = Rendered::default();
    let c = comment(comment_text);
    let key = &plan.key;
    let cluster_balances = plan.cluster_view.as_ref().is_some_and(|(_, v)| balances(v));
    if !balances(&plan.view) && !cluster_balances {
        // Nothing is translated: the filter table refuses.
        return out;
    }
    // The endpoint choice of each view that balances.
    let main_choice = if plan.cluster_view.is_some() {
        svl_chain(key)
    } else {
        svc_chain(key)
    };
    if let Action::Balance(backends) = &plan.view.action {
        // A ClusterIP marks in its choice chain, an external frontend in
        // its KUBE-EXT chain.
        let masquerade = (!external).then_some(&plan.view.masquerade);
        let rules = choice_rules(plan, backends, masquerade, &c);
        out.chains.insert(main_choice.clone(), rules);
    }
    if let Some((_, view)) = &plan.cluster_view
        && let Action::Balance(backends) = &view.action
    {
        let rules = choice_rules(plan, backends, Some(&view.masquerade), &c);
        out.chains.insert(svc_chain(key), rules);
    }
    for b in plan.backends() {
        out.chains
            .insert(sep_chain(key, &b), sep_rules(plan, &b, &c));
    }
    if !external {
        out.entry = Some(format!(
            "{c} -d {} {} -j {main_choice}",
            host(key.ip),
            dport(key)
        ));
        return out;
    }
    // KUBE-EXT: the pods' short-circuit, the masquerade mark, the main view.
    let ext = ext_chain(key);
    let mut rules = Vec::new();
    if let Some((cidr, view)) = &plan.cluster_view {
        let target = if balances(view) {
            svc_chain(key)
        } else {
            // The pods' view refuses: the filter table does it for them.
            "RETURN".to_string()
        };
        rules.push(format!("{c} -s {} -j {target}", net(cidr)));
    }
    if balances(&plan.view) {
        rules.extend(mark_rule(&plan.view.masquerade, &c));
        if plan.masquerade_loopback {
            rules.push(format!("{c} -s 127.0.0.0/8 -j {MARK_MASQ_CHAIN}"));
        }
        rules.push(format!("{c} -j {main_choice}"));
    }
    out.chains.insert(ext.clone(), rules);
    let mut target = ext;
    if let Some(ranges) = &plan.source_ranges {
        let fw = fw_chain(key);
        let rules = ranges
            .iter()
            .map(|r| format!("{c} -s {} -j {target}", net(r)))
            .chain(std::iter::once(comment(&format!(
                "other traffic to {comment_text} will be dropped by {FIREWALL_CHAIN}"
            ))))
            .collect();
        out.chains.insert(fw.clone(), rules);
        target = fw;
    }
    out.entry = Some(if plan.is_node_port() {
        format!("{c} {} -j {target}", dport(key))
    } else {
        format!("{c} -d {} {} -j {target}", host(key.ip), dport(key))
    });
    out
}

/// The masquerade mark rule of a view, if it marks.
fn mark_rule(masquerade: &Masquerade, c: &str) -> Option<String> {
    match masquerade {
        Masquerade::Never => None,
        Masquerade::Always => Some(format!("{c} -j {MARK_MASQ_CHAIN}")),
        Masquerade::SourceOutside(cidr) => {
            Some(format!("{c} ! -s {} -j {MARK_MASQ_CHAIN}", net(cidr)))
        }
    }
}

/// A choice chain: masquerade mark (ClusterIP), affinity checks, cascade.
fn choice_rules(
    plan: &FrontendPlan,
    backends: &[Backend],
    masquerade: Option<&Masquerade>,
    c: &str,
) -> Vec<String> {
    let mut rules = Vec::new();
    if let Some(m) = masquerade {
        rules.extend(mark_rule(m, c));
    }
    let seps: Vec<String> = backends.iter().map(|b| sep_chain(&plan.key, b)).collect();
    if let Some(timeout) = plan.affinity_timeout_secs {
        for sep in &seps {
            rules.push(format!(
                "{c} -m recent --name {sep} --rcheck --seconds {timeout} --reap --rsource -j {sep}"
            ));
        }
    }
    let n = seps.len();
    for (i, sep) in seps.iter().enumerate() {
        if i + 1 < n {
            rules.push(format!(
                "{c} -m statistic --mode random --probability {} -j {sep}",
                probability(n - i)
            ));
        } else {
            rules.push(format!("{c} -j {sep}"));
        }
    }
    rules
}

/// An endpoint chain: hairpin, then DNAT (remembering the client under
/// affinity).
fn sep_rules(plan: &FrontendPlan, backend: &Backend, c: &str) -> Vec<String> {
    let sep = sep_chain(&plan.key, backend);
    let p = proto_name(plan.key.protocol);
    let affinity = if plan.affinity_timeout_secs.is_some() {
        format!(" -m recent --name {sep} --set --rsource")
    } else {
        String::new()
    };
    vec![
        format!("{c} -s {} -j {MARK_MASQ_CHAIN}", host(backend.ip)),
        format!(
            "{c} -p {p}{affinity} -m {p} -j DNAT --to-destination {}",
            addr_port(backend)
        ),
    ]
}

/// Which filter chain a refusal goes to, and its rules: (chain, rule).
fn filter_rules(
    plan: &FrontendPlan,
    comment_text: &str,
    nodeport_addresses: &BTreeSet<IpAddr>,
    external: bool,
) -> Vec<(&'static str, String)> {
    let c = comment(comment_text);
    let key = &plan.key;
    let destinations: Vec<String> = if plan.is_node_port() {
        nodeport_addresses
            .iter()
            .filter(|ip| Family::of(**ip) == plan.family)
            .map(|ip| format!("-d {} {}", host(*ip), dport(key)))
            .collect()
    } else {
        vec![format!("-d {} {}", host(key.ip), dport(key))]
    };
    let verdict = |action: &Action| -> Option<String> {
        match action {
            Action::Balance(_) => None,
            Action::Reject if key.protocol == Protocol::Tcp => {
                Some("-j REJECT --reject-with tcp-reset".to_string())
            }
            Action::Reject => Some("-j REJECT".to_string()),
            Action::Drop => Some("-j DROP".to_string()),
        }
    };
    let chain_of = |action: &Action| -> &'static str {
        match action {
            Action::Reject if !plan.is_node_port() => SERVICES_CHAIN,
            Action::Drop if !external => SERVICES_CHAIN,
            _ => EXTERNAL_SERVICES_CHAIN,
        }
    };
    // (source match, action) per view.
    let mut refusals: Vec<(String, &Action)> = Vec::new();
    match &plan.cluster_view {
        Some((_, view)) if view.action == plan.view.action => {
            refusals.push((String::new(), &plan.view.action));
        }
        Some((cidr, view)) => {
            refusals.push((format!(" -s {}", net(cidr)), &view.action));
            refusals.push((format!(" ! -s {}", net(cidr)), &plan.view.action));
        }
        None => refusals.push((String::new(), &plan.view.action)),
    }
    let mut out = Vec::new();
    // Sources outside the ranges: dropped whatever the views do. Admitted
    // sources that reach this point were not translated because their view
    // refuses: they go on to that refusal. (A RETURN only skips rules of
    // other frontends, which cannot match the same destination.)
    if let Some(ranges) = &plan.source_ranges {
        let refuses = refusals
            .iter()
            .any(|(_, a)| !matches!(a, Action::Balance(_)));
        for d in &destinations {
            if refuses {
                for r in ranges {
                    out.push((FIREWALL_CHAIN, format!("{c} -s {} {d} -j RETURN", net(r))));
                }
            }
            out.push((
                FIREWALL_CHAIN,
                format!(
                    "{} {d} -j DROP",
                    comment(&format!(
                        "{comment_text} traffic not accepted by {}",
                        fw_chain(key)
                    ))
                ),
            ));
        }
    }
    for (src, action) in refusals {
        let Some(verdict) = verdict(action) else {
            continue;
        };
        for d in &destinations {
            out.push((chain_of(action), format!("{c}{src} {d} {verdict}")));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Restore input.

/// The lines of one table of a restore: declarations (which create or
/// flush), rules, then deletions of chains.
#[derive(Debug, Default)]
struct TableInput {
    declare: BTreeSet<String>,
    rules: Vec<String>,
    delete: BTreeSet<String>,
}

impl TableInput {
    fn is_empty(&self) -> bool {
        self.declare.is_empty() && self.rules.is_empty() && self.delete.is_empty()
    }

    /// Declares `chain` and appends its rules.
    fn chain(&mut self, chain: &str, rules: &[String]) {
        self.declare.insert(chain.to_string());
        for r in rules {
            self.rules.push(format!("-A {chain} {r}"));
        }
    }

    /// Flushes and deletes `chain`.
    fn remove(&mut self, chain: &str) {
        self.declare.insert(chain.to_string());
        self.delete.insert(chain.to_string());
    }

    fn write(&self, table: &str, out: &mut String) {
        if self.is_empty() {
            return;
        }
        let _ = writeln!(out, "*{table}");
        for chain in &self.declare {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for rule in &self.rules {
            let _ = writeln!(out, "{rule}");
        }
        for chain in &self.delete {
            let _ = writeln!(out, "-X {chain}");
        }
        let _ = writeln!(out, "COMMIT");
    }
}

/// One family's restore: nat then filter.
#[derive(Debug, Default)]
struct RestoreInput {
    nat: TableInput,
    filter: TableInput,
}

impl RestoreInput {
    fn table(&mut self, table: &str) -> &mut TableInput {
        match table {
            "nat" => &mut self.nat,
            _ => &mut self.filter,
        }
    }

    fn is_empty(&self) -> bool {
        self.nat.is_empty() && self.filter.is_empty()
    }

    fn text(&self) -> String {
        let mut out = String::new();
        self.nat.write("nat", &mut out);
        self.filter.write("filter", &mut out);
        out
    }
}

/// A jump from a built-in chain to one of ours.
struct Hook {
    table: &'static str,
    from: &'static str,
    spec: &'static str,
    to: &'static str,
}

/// The jumps, in the order they stand at the top of their built-in chains.
const HOOKS: [Hook; 12] = [
    Hook {
        table: "nat",
        from: "PREROUTING",
        spec: "-m comment --comment \"kubernetes service portals\"",
        to: SERVICES_CHAIN,
    },
    Hook {
        table: "nat",
        from: "OUTPUT",
        spec: "-m comment --comment \"kubernetes service portals\"",
        to: SERVICES_CHAIN,
    },
    Hook {
        table: "nat",
        from: "POSTROUTING",
        spec: "-m comment --comment \"kubernetes postrouting rules\"",
        to: POSTROUTING_CHAIN,
    },
    Hook {
        table: "filter",
        from: "INPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\"",
        to: FIREWALL_CHAIN,
    },
    Hook {
        table: "filter",
        from: "INPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\"",
        to: SERVICES_CHAIN,
    },
    Hook {
        table: "filter",
        from: "INPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\"",
        to: EXTERNAL_SERVICES_CHAIN,
    },
    Hook {
        table: "filter",
        from: "FORWARD",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\"",
        to: FIREWALL_CHAIN,
    },
    Hook {
        table: "filter",
        from: "FORWARD",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\"",
        to: SERVICES_CHAIN,
    },
    Hook {
        table: "filter",
        from: "FORWARD",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\"",
        to: EXTERNAL_SERVICES_CHAIN,
    },
    Hook {
        table: "filter",
        from: "OUTPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\"",
        to: FIREWALL_CHAIN,
    },
    Hook {
        table: "filter",
        from: "OUTPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\"",
        to: SERVICES_CHAIN,
    },
    Hook {
        table: "filter",
        from: "OUTPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\"",
        to: EXTERNAL_SERVICES_CHAIN,
    },
];

/// The rules of the base chains that hold no frontend.
fn base_chain_rules() -> [(&'static str, Vec<String>); 2] {
    let mark = format!("{MASQUERADE_MARK:#x}");
    [
        (MARK_MASQ_CHAIN, vec![format!("-j MARK --or-mark {mark}")]),
        (
            POSTROUTING_CHAIN,
            vec![
                format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
                format!("-j MARK --xor-mark {mark}"),
                format!(
                    "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
                ),
            ],
        ),
    ]
}

/// Adds what the base needs against what `nat` and `filter` hold: the base
/// chains (rewritten when `force`, or when missing or holding another
/// number of rules), the top-level chains when missing (created empty), and
/// the missing jumps of the built-in chains (extra copies deleted). Returns
/// (writes, deletes) done to repair drift.
fn base_input(
    input: &mut RestoreInput,
    nat: &Saved,
    filter: &Saved,
    force: bool,
) -> (usize, usize) {
    let (mut writes, mut deletes) = (0, 0);
    for (chain, rules) in base_chain_rules() {
        let differs = !nat.has(chain) || nat.rules(chain).len() != rules.len();
        if differs && nat.has(chain) {
            writes += 1;
        }
        if differs || force {
            input.nat.chain(chain, &rules);
        }
    }
    for chain in [SERVICES_CHAIN, NODEPORTS_CHAIN] {
        if !nat.has(chain) {
            input.nat.declare.insert(chain.to_string());
        }
    }
    for chain in [SERVICES_CHAIN, EXTERNAL_SERVICES_CHAIN, FIREWALL_CHAIN] {
        if !filter.has(chain) {
            input.filter.declare.insert(chain.to_string());
        }
    }
    // Jumps: inserted at the top in reverse, so they end up in HOOKS' order.
    let mut inserts: Vec<(&'static str, String)> = Vec::new();
    let mut removals: Vec<(&'static str, String)> = Vec::new();
    let mut seen: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
    for hook in &HOOKS {
        if !seen.insert((hook.table, hook.from, hook.to)) {
            continue;
        }
        let saved = if hook.table == "nat" { nat } else { filter };
        let present: Vec<&String> = saved
            .rules(hook.from)
            .iter()
            .filter(|r| target_of(r) == Some(hook.to))
            .collect();
        if present.is_empty() {
            inserts.push((
                hook.table,
                format!("-I {} 1 {} -j {}", hook.from, hook.spec, hook.to),
            ));
            writes += 1;
        }
        for extra in present.iter().skip(1) {
            removals.push((hook.table, format!("-D {} {extra}", hook.from)));
            deletes += 1;
        }
    }
    for (table, line) in removals.into_iter().chain(inserts.into_iter().rev()) {
        input.table(table).rules.push(line);
    }
    (writes, deletes)
}

// ---------------------------------------------------------------------------
// Splitting a write into restores.

/// Most chains one restore declares (writes, flushes or deletes).
/// iptables-nft keeps the names of the chains a restore touches in a sorted
/// list, inserted one at a time, so a restore's cost grows with the square
/// of its chains: at 33 000 chains (3 000 services with 10 endpoints) it
/// spent 20 s there, against 5 s for the rules themselves.
pub const CHAINS_PER_RESTORE: usize = 2_000;

/// Most top-level rules one restore deletes one by one (`-D`, a search
/// through the chain each); a write that removes more rewrites the
/// top-level chains whole.
pub const TOP_LEVEL_DELETES: usize = 50;

/// How a write treats the top-level chains (`KUBE-SERVICES`,
/// `KUBE-NODEPORTS` and the filter chains).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopLevel {
    /// Delete the rules of the frontends whose rules change and insert
    /// their new ones at the top: a sync at 10 000 services then does not
    /// rewrite 10 000 rules for one change.
    Edit,
    /// Rewrite them whole (first sync, reconcile after drift, new node
    /// addresses).
    Rewrite,
}

/// The order in which chains can be deleted: a chain only jumps to chains
/// of a later rank, so deleting rank by rank, each restore flushing what it
/// deletes, never deletes a chain that a chain not yet deleted still jumps
/// to.
fn deletion_rank(chain: &str) -> u8 {
    if chain == NODEPORTS_CHAIN {
        1
    } else if chain.starts_with("KUBE-FW-") {
        2
    } else if chain.starts_with("KUBE-XLB-") || chain.starts_with("KUBE-EXT-") {
        3
    } else if chain.starts_with("KUBE-SVC-") || chain.starts_with("KUBE-SVL-") {
        4
    } else if chain.starts_with("KUBE-SEP-") {
        5
    } else if chain == MARK_MASQ_CHAIN {
        6
    } else {
        0
    }
}

/// `chains` sorted by [`deletion_rank`], in groups of at most `limit`.
fn deletion_chunks<'a>(
    chains: impl IntoIterator<Item = &'a String>,
    limit: usize,
) -> Vec<Vec<&'a String>> {
    let mut sorted: Vec<&String> = chains.into_iter().collect();
    sorted.sort_by_key(|c| (deletion_rank(c), c.as_str()));
    sorted.dedup();
    sorted
        .chunks(limit.max(1))
        .map(<[&String]>::to_vec)
        .collect()
}

// ---------------------------------------------------------------------------
// The dataplane.

/// The rules of one frontend in the top-level chains, by (table, chain), in
/// order.
type TopRules = BTreeMap<(&'static str, &'static str), Vec<String>>;

/// What is programmed for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    frontend: Frontend,
    plan: FrontendPlan,
    rendered: Rendered,
    top: TopRules,
}

impl Programmed {
    fn new(key: &FrontendKey, frontend: &Frontend, network: &NodeNetwork) -> Programmed {
        let plan = netfilter::plan(key, frontend, network);
        let comment = comment_of(frontend);
        let external = frontend.kind.is_external();
        let rendered = render(&plan, &comment, external);
        let mut top = TopRules::new();
        if let Some(entry) = &rendered.entry {
            let chain = if plan.is_node_port() {
                NODEPORTS_CHAIN
            } else {
                SERVICES_CHAIN
            };
            top.entry(("nat", chain)).or_default().push(entry.clone());
        }
        for (chain, rule) in filter_rules(&plan, &comment, &network.nodeport_addresses, external) {
            top.entry(("filter", chain)).or_default().push(rule);
        }
        Programmed {
            frontend: frontend.clone(),
            plan,
            rendered,
            top,
        }
    }
}

/// Programs services with iptables-restore, in kube-proxy's chains.
pub struct IptablesDataplane {
    backend: IptablesBackend,
    network: NodeNetwork,
    /// What the kernel holds, per frontend.
    programmed: BTreeMap<FrontendKey, Programmed>,
    /// Whether the base chains and jumps are known to exist.
    based: bool,
    /// When every chain was last rewritten (`None`: not since start).
    last_rewrite: Option<Instant>,
}

impl Default for IptablesDataplane {
    fn default() -> Self {
        Self::new(IptablesBackend::default())
    }
}

impl IptablesDataplane {
    pub fn new(backend: IptablesBackend) -> Self {
        IptablesDataplane {
            backend,
            network: NodeNetwork::default(),
            programmed: BTreeMap::new(),
            based: false,
            last_rewrite: None,
        }
    }

    fn program(&self, key: &FrontendKey, frontend: &Frontend) -> Programmed {
        Programmed::new(key, frontend, &self.network)
    }

    /// The top-level chains of `family`, whole, from `frontends` (all of
    /// them, in the order their rules are to stand).
    fn top_level<'a>(
        frontends: impl Iterator<Item = &'a Programmed>,
        network: &NodeNetwork,
        family: Family,
        input: &mut RestoreInput,
    ) {
        let mut chains: TopRules = TopRules::new();
        for p in frontends.filter(|p| p.plan.family == family) {
            for (at, rules) in &p.top {
                chains.entry(*at).or_default().extend(rules.iter().cloned());
            }
        }
        let services = chains.entry(("nat", SERVICES_CHAIN)).or_default();
        for ip in network
            .nodeport_addresses
            .iter()
            .filter(|ip| Family::of(**ip) == family)
        {
            services.push(format!(
                "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d {} -j {NODEPORTS_CHAIN}",
                host(*ip)
            ));
        }
        for at in [
            ("nat", SERVICES_CHAIN),
            ("nat", NODEPORTS_CHAIN),
            ("filter", SERVICES_CHAIN),
            ("filter", EXTERNAL_SERVICES_CHAIN),
            ("filter", FIREWALL_CHAIN),
        ] {
            let rules = chains.get(&at).map_or(&[][..], Vec::as_slice);
            input.table(at.0).chain(at.1, rules);
        }
    }

    /// The restores of `family`, in order, that turn what is programmed for
    /// `keys` into `wanted` (a key missing from `wanted` is removed), also
    /// deleting `unwanted` chains and flushing `flushed` ones (nat; found by
    /// a reconcile).
    ///
    /// A small write is one restore: the changed chains, the top-level
    /// edits, the deletions. A large one (more than [`CHAINS_PER_RESTORE`]
    /// chains) is split: first the changed chains, a frontend's together, in
    /// restores of at most that many chains (a new chain is not jumped to
    /// yet, so nothing sees it and the kernel does not validate it at each
    /// commit); then one restore of the top-level chains, which makes them
    /// reachable; then the deletions, by [`deletion_rank`].
    fn restores(
        &self,
        family: Family,
        keys: &[FrontendKey],
        wanted: &BTreeMap<FrontendKey, Programmed>,
        top: TopLevel,
        unwanted: &BTreeSet<String>,
        flushed: &BTreeSet<String>,
    ) -> Vec<RestoreInput> {
        let mut groups: Vec<Vec<(&str, &[String])>> = Vec::new();
        let mut gone: BTreeSet<&String> = unwanted.iter().collect();
        let mut deletes: Vec<(&'static str, &'static str, &String)> = Vec::new();
        let mut inserts: Vec<(&'static str, &'static str, &[String])> = Vec::new();
        let empty = TopRules::new();
        let touched: BTreeSet<&FrontendKey> =
            keys.iter().filter(|k| Family::of(k.ip) == family).collect();
        for key in &touched {
            let old = self.programmed.get(key);
            let new = wanted.get(key);
            let mut group = Vec::new();
            if let Some(new) = new {
                for (chain, rules) in &new.rendered.chains {
                    if old.and_then(|o| o.rendered.chains.get(chain)) != Some(rules) {
                        group.push((chain.as_str(), rules.as_slice()));
                    }
                }
            }
            if !group.is_empty() {
                groups.push(group);
            }
            if let Some(old) = old {
                gone.extend(
                    old.rendered
                        .chains
                        .keys()
                        .filter(|c| new.is_none_or(|n| !n.rendered.chains.contains_key(*c))),
                );
            }
            let old_top = old.map_or(&empty, |o| &o.top);
            let new_top = new.map_or(&empty, |n| &n.top);
            let places: BTreeSet<&(&str, &str)> = old_top.keys().chain(new_top.keys()).collect();
            for at in places {
                let (before, after) = (old_top.get(at), new_top.get(at));
                if before == after {
                    continue;
                }
                for rule in before.into_iter().flatten() {
                    deletes.push((at.0, at.1, rule));
                }
                if let Some(rules) = after {
                    inserts.push((at.0, at.1, rules));
                }
            }
        }
        let edit = |input: &mut RestoreInput| {
            for (table, chain, rule) in &deletes {
                input.table(table).rules.push(format!("-D {chain} {rule}"));
            }
            // At the top, in reverse, so a frontend's rules keep their
            // order (and KUBE-SERVICES' NodePort jump stays last).
            for (table, chain, rules) in &inserts {
                for rule in rules.iter().rev() {
                    input
                        .table(table)
                        .rules
                        .push(format!("-I {chain} 1 {rule}"));
                }
            }
        };
        let whole = |input: &mut RestoreInput| {
            // What is programmed after the write, in key order (so the
            // top-level chains keep theirs from one rewrite to the next).
            let mut after: BTreeMap<&FrontendKey, &Programmed> = self
                .programmed
                .iter()
                .filter(|(k, _)| Family::of(k.ip) == family && !touched.contains(k))
                .collect();
            after.extend(touched.iter().filter_map(|k| Some((*k, wanted.get(*k)?))));
            Self::top_level(after.into_values(), &self.network, family, input);
        };
        let edits = top == TopLevel::Edit && deletes.len() <= TOP_LEVEL_DELETES;
        // The top-level chains (edited or whole), and the kept chains
        // flushed with them.
        let top_input = |input: &mut RestoreInput| {
            if edits {
                edit(input);
            } else {
                whole(input);
            }
            input.nat.declare.extend(flushed.iter().cloned());
        };
        let chains: usize = groups.iter().map(Vec::len).sum::<usize>() + gone.len() + flushed.len();
        let limit = self.backend.chains_per_restore();
        let mut out = Vec::new();
        if chains <= limit {
            let mut input = RestoreInput::default();
            for (chain, rules) in groups.iter().flatten() {
                input.nat.chain(chain, rules);
            }
            top_input(&mut input);
            for chain in gone {
                input.nat.remove(chain);
            }
            if !input.is_empty() {
                out.push(input);
            }
            return out;
        }
        let mut input = RestoreInput::default();
        let mut declared = 0;
        for group in &groups {
            if declared + group.len() > limit && declared > 0 {
                out.push(std::mem::take(&mut input));
                declared = 0;
            }
            for (chain, rules) in group {
                input.nat.chain(chain, rules);
            }
            declared += group.len();
        }
        if declared > 0 {
            out.push(input);
        }
        let mut input = RestoreInput::default();
        top_input(&mut input);
        if !input.is_empty() {
            out.push(input);
        }
        for chunk in deletion_chunks(gone, limit) {
            let mut input = RestoreInput::default();
            for chain in chunk {
                input.nat.remove(chain);
            }
            out.push(input);
        }
        out
    }

    /// Writes `wanted` for `keys`, family by family (also a family without
    /// a key when it is in `force`). What is programmed is updated per
    /// family once its restores all passed; on an error, the caller's next
    /// sync is a reconcile, which reads the kernel.
    fn write(
        &mut self,
        keys: &[FrontendKey],
        wanted: &BTreeMap<FrontendKey, Programmed>,
        top: TopLevel,
        force: &[Family],
    ) -> Result<(), IptablesError> {
        let none = BTreeSet::new();
        for family in [Family::V4, Family::V6] {
            let mine: Vec<FrontendKey> = keys
                .iter()
                .filter(|k| Family::of(k.ip) == family)
                .copied()
                .collect();
            if mine.is_empty() && !force.contains(&family) {
                continue;
            }
            for input in self.restores(family, &mine, wanted, top, &none, &none) {
                restore(self.backend, family, &input.text())?;
            }
            for key in mine {
                match wanted.get(&key) {
                    Some(p) => {
                        self.programmed.insert(key, p.clone());
                    }
                    None => {
                        self.programmed.remove(&key);
                    }
                }
            }
        }
        Ok(())
    }

    fn ensure_base(&mut self) -> Result<(), IptablesError> {
        for family in [Family::V4, Family::V6] {
            let nat = save(self.backend, family, "nat", false)?;
            let filter = save(self.backend, family, "filter", false)?;
            let mut input = RestoreInput::default();
            base_input(&mut input, &nat, &filter, true);
            restore(self.backend, family, &input.text())?;
        }
        self.based = true;
        Ok(())
    }

    fn apply_diff(&mut self, diff: &TableDiff) -> Result<ApplyStats, IptablesError> {
        if !self.based {
            self.ensure_base()?;
        }
        let mut stats = ApplyStats {
            frontends_added: diff.added.len(),
            frontends_changed: diff.changed.len(),
            frontends_removed: diff.removed.len(),
            map_writes: diff.added.len(),
            map_deletes: diff.removed.len(),
            ..ApplyStats::default()
        };
        let (keys, wanted) = self.wanted_of(diff);
        self.write(&keys, &wanted, TopLevel::Edit, &[])?;
        stats.conntrack_deletes = netfilter::forget_stale_udp_flows(diff)?;
        Ok(stats)
    }

    /// The keys `diff` touches, and what is wanted for those it keeps.
    fn wanted_of(&self, diff: &TableDiff) -> (Vec<FrontendKey>, BTreeMap<FrontendKey, Programmed>) {
        netfilter::wanted_of(diff, |k, f| self.program(k, f))
    }

    /// How many top-level chains of `family` hold another number of rules
    /// in `nat` and `filter` than `frontends` (all of them) give.
    fn top_drift<'a>(
        &self,
        frontends: impl Iterator<Item = &'a Programmed>,
        family: Family,
        nat: &Saved,
        filter: &Saved,
    ) -> usize {
        let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for p in frontends.filter(|p| p.plan.family == family) {
            for (at, rules) in &p.top {
                *counts.entry(*at).or_default() += rules.len();
            }
        }
        *counts.entry(("nat", SERVICES_CHAIN)).or_default() += self
            .network
            .nodeport_addresses
            .iter()
            .filter(|ip| Family::of(**ip) == family)
            .count();
        let mut drift = 0;
        for (table, chains) in CHECKED_CHAINS {
            let saved = if table == "nat" { nat } else { filter };
            for chain in chains.iter().filter(|c| !BUILT_IN.contains(*c)) {
                let want = match *chain {
                    MARK_MASQ_CHAIN | POSTROUTING_CHAIN => continue,
                    _ => counts.get(&(table, *chain)).copied().unwrap_or(0),
                };
                if !saved.has(chain) || saved.rules(chain).len() != want {
                    drift += 1;
                }
            }
        }
        drift
    }

    /// Makes the kernel equal to `desired`. Within
    /// [`super::nftables::FULL_REWRITE_PERIOD`] of the last full rewrite, it
    /// reads only the built-in and top-level chains ([`CHECKED_CHAINS`],
    /// with `iptables -S`); when they hold what was programmed, only the
    /// frontends that differ from it are written (usually none). Otherwise
    /// (first reconcile, hourly, or when those chains differ) it saves both
    /// tables, counts what is missing or extra as drift (`map_writes`: a
    /// wanted chain missing or holding another number of rules, a missing
    /// jump; `map_deletes`: an unwanted chain of ours, an extra copy of a
    /// jump), rewrites every chain of ours (which also repairs rules edited
    /// by hand) and deletes those nobody wants.
    pub fn reconcile_table(&mut self, desired: &ServiceTable) -> Result<ApplyStats, IptablesError> {
        let mut stats = ApplyStats::default();
        let wanted: BTreeMap<FrontendKey, Programmed> = desired
            .iter()
            .map(|(k, f)| (*k, self.program(k, f)))
            .collect();
        let rewrite_all = self
            .last_rewrite
            .is_none_or(|at| at.elapsed() >= super::nftables::FULL_REWRITE_PERIOD);
        if !rewrite_all {
            // Between full checks, only the chains that hold the jumps and
            // the top level are read (a few milliseconds, where saving the
            // whole nat table can take minutes); a frontend's own chains are
            // checked by the full check.
            let mut drift = false;
            for family in [Family::V4, Family::V6] {
                let [(_, nat_chains), (_, filter_chains)] = CHECKED_CHAINS;
                let nat = list_chains(self.backend, family, "nat", nat_chains)?;
                let filter = list_chains(self.backend, family, "filter", filter_chains)?;
                let mut base = RestoreInput::default();
                base_input(&mut base, &nat, &filter, false);
                drift |= !base.is_empty()
                    || self.top_drift(self.programmed.values(), family, &nat, &filter) > 0;
            }
            if !drift {
                // The kernel holds what we programmed: write what differs.
                let mut keys: BTreeSet<FrontendKey> = wanted.keys().copied().collect();
                keys.extend(self.programmed.keys().copied());
                let keys: Vec<FrontendKey> = keys.into_iter().collect();
                let before = self.programmed.clone();
                self.write(&keys, &wanted, TopLevel::Edit, &[])?;
                stats.frontends_changed = keys
                    .iter()
                    .filter(|k| before.get(k) != self.programmed.get(k))
                    .count();
                return Ok(stats);
            }
            tracing::info!(
                "the top-level iptables chains differ from what was programmed; checking every chain"
            );
        }
        let mut found = Vec::new();
        for family in [Family::V4, Family::V6] {
            let nat = save(self.backend, family, "nat", false)?;
            // Of filter, only the chains we write or jump from matter;
            // iptables-nft-save of filter reads every table (5 s at 10 000
            // services), listing them takes milliseconds.
            let [_, (_, filter_chains)] = CHECKED_CHAINS;
            let filter = list_chains(self.backend, family, "filter", filter_chains)?;
            let mut base = RestoreInput::default();
            let (w, d) = base_input(&mut base, &nat, &filter, true);
            stats.map_writes += w;
            stats.map_deletes += d;
            restore(self.backend, family, &base.text())?;
            let mut wanted_chains: BTreeSet<&str> = BTreeSet::new();
            for p in wanted.values().filter(|p| p.plan.family == family) {
                for (chain, rules) in &p.rendered.chains {
                    if !nat.has(chain) || nat.rules(chain).len() != rules.len() {
                        stats.map_writes += 1;
                    }
                    wanted_chains.insert(chain);
                }
            }
            stats.map_writes += self.top_drift(wanted.values(), family, &nat, &filter);
            let unwanted: BTreeSet<String> = nat
                .chains
                .keys()
                .filter(|c| {
                    FRONTEND_PREFIXES.iter().any(|p| c.starts_with(p))
                        && !wanted_chains.contains(c.as_str())
                })
                .cloned()
                .collect();
            // A chain of ours that a chain we do not rewrite jumps to (an
            // operator's rule) cannot be deleted: it is flushed and kept,
            // rather than failing every reconcile.
            let kept: BTreeSet<String> = foreign_references(&nat, |c| {
                unwanted.contains(c) || wanted_chains.contains(c.as_str()) || is_top_level(c)
            })
            .into_iter()
            .map(str::to_string)
            .collect();
            let mut delete = BTreeSet::new();
            let mut flush = BTreeSet::new();
            for chain in unwanted {
                if !kept.contains(&chain) {
                    stats.map_deletes += 1;
                    delete.insert(chain);
                } else if !nat.rules(&chain).is_empty() {
                    // Once flushed, it is left alone (and not counted again).
                    tracing::warn!(chain = %chain, "another chain jumps to this unwanted chain; flushing it, not deleting it");
                    stats.map_deletes += 1;
                    flush.insert(chain);
                }
            }
            found.push((family, delete, flush));
        }
        self.based = true;
        // Forget what we believe is programmed and rewrite every wanted
        // chain; chains the kernel holds are flushed in the restore that
        // refills them.
        self.last_rewrite = None;
        self.programmed.clear();
        for (family, delete, flush) in found {
            let keys: Vec<FrontendKey> = wanted
                .keys()
                .filter(|k| Family::of(k.ip) == family)
                .copied()
                .collect();
            for input in self.restores(family, &keys, &wanted, TopLevel::Rewrite, &delete, &flush) {
                restore(self.backend, family, &input.text())?;
            }
            // What the first family holds is programmed even if the second
            // fails.
            for key in keys {
                if let Some(p) = wanted.get(&key) {
                    self.programmed.insert(key, p.clone());
                }
            }
        }
        self.last_rewrite = Some(Instant::now());
        stats.frontends_added = wanted.len();
        Ok(stats)
    }

    fn set_network(&mut self, network: &NodeNetwork) -> Result<(), IptablesError> {
        netfilter::allow_localhost_nodeports(network);
        let changed = network.cluster_cidrs != self.network.cluster_cidrs
            || network.masquerade_all != self.network.masquerade_all
            || network.nodeport_addresses != self.network.nodeport_addresses;
        self.network = network.clone();
        if !self.based {
            return self.ensure_base();
        }
        if changed {
            // Plans (masquerading, loopback, the NodePort addresses in the
            // filter rules) and the NodePort jumps depend on the network.
            let wanted: BTreeMap<FrontendKey, Programmed> = self
                .programmed
                .iter()
                .map(|(k, p)| (*k, self.program(k, &p.frontend)))
                .collect();
            let keys: Vec<FrontendKey> = wanted.keys().copied().collect();
            self.write(&keys, &wanted, TopLevel::Rewrite, &[Family::V4, Family::V6])?;
        }
        Ok(())
    }
}

impl Dataplane for IptablesDataplane {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn apply(&mut self, diff: &TableDiff) -> Result<ApplyStats, DataplaneError> {
        Ok(self.apply_diff(diff)?)
    }

    fn reconcile(&mut self, desired: &ServiceTable) -> Result<ApplyStats, DataplaneError> {
        Ok(self.reconcile_table(desired)?)
    }

    fn set_node_network(&mut self, network: &NodeNetwork) -> Result<(), DataplaneError> {
        Ok(self.set_network(network)?)
    }
}

// ---------------------------------------------------------------------------
// Cleanup.

/// The chains kube-proxy's iptables mode creates, by table, besides the
/// per-frontend ones ([`FRONTEND_PREFIXES`]). Ours are a subset (same
/// names), so one cleanup serves both. Not kubelet's: `KUBE-FIREWALL`,
/// `KUBE-KUBELET-CANARY`, `KUBE-MARK-DROP` stay.
const KUBE_PROXY_CHAINS: [(&str, &[&str]); 3] = [
    (
        "nat",
        &[
            SERVICES_CHAIN,
            NODEPORTS_CHAIN,
            POSTROUTING_CHAIN,
            MARK_MASQ_CHAIN,
            "KUBE-PROXY-CANARY",
        ],
    ),
    (
        "filter",
        &[
            SERVICES_CHAIN,
            EXTERNAL_SERVICES_CHAIN,
            FIREWALL_CHAIN,
            NODEPORTS_CHAIN,
            "KUBE-FORWARD",
            "KUBE-PROXY-CANARY",
        ],
    ),
    ("mangle", &["KUBE-PROXY-CANARY"]),
];

const BUILT_IN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// The nat chains this mode writes whole besides the frontends' ones.
fn is_top_level(chain: &str) -> bool {
    [
        SERVICES_CHAIN,
        NODEPORTS_CHAIN,
        POSTROUTING_CHAIN,
        MARK_MASQ_CHAIN,
    ]
    .contains(&chain)
}

/// The targets of rules in chains of `saved` that `ours` does not claim
/// (built-in chains included).
fn foreign_references(saved: &Saved, ours: impl Fn(&String) -> bool) -> BTreeSet<&str> {
    saved
        .chains
        .iter()
        .filter(|(chain, _)| !ours(chain))
        .flat_map(|(_, rules)| rules.iter().filter_map(|r| target_of(r)))
        .collect()
}

/// What to remove from one table, as the table's part of successive
/// restores: the jumps from built-in chains to `ours` (deleted by their
/// exact text), then `ours` flushed and deleted by [`deletion_rank`], at
/// most `limit` per restore. A chain of ours that another
/// chain (not ours, not built in) jumps to is flushed but kept: deleting it
/// would fail the whole restore. Returns how many jumps and chains go, and
/// the parts (none when nothing goes).
fn cleanup_input(
    table: &str,
    saved: &Saved,
    ours: &BTreeSet<String>,
    limit: usize,
) -> (usize, Vec<TableInput>) {
    let mut removed = 0;
    let mut first = TableInput::default();
    let mut referenced: BTreeSet<&str> = BTreeSet::new();
    for (chain, rules) in &saved.chains {
        if ours.contains(chain) {
            continue;
        }
        for rule in rules {
            let Some(target) = target_of(rule).filter(|t| ours.contains(*t)) else {
                continue;
            };
            if BUILT_IN.contains(&chain.as_str()) {
                first.rules.push(format!("-D {chain} {rule}"));
                removed += 1;
            } else {
                tracing::warn!(table, chain = %chain, target, "a foreign chain jumps to ours; keeping ours (flushed)");
                referenced.insert(target);
            }
        }
    }
    let mut remove = Vec::new();
    for chain in ours.iter().filter(|c| saved.has(c)) {
        if !referenced.contains(chain.as_str()) {
            remove.push(chain);
            removed += 1;
        } else if !saved.rules(chain).is_empty() {
            // Kept, empty: a second cleanup finds nothing more to do.
            first.declare.insert(chain.clone());
            removed += 1;
        }
    }
    let mut parts = vec![first];
    for (i, chunk) in deletion_chunks(remove, limit).into_iter().enumerate() {
        if i > 0 {
            parts.push(TableInput::default());
        }
        let part = parts.last_mut().expect("parts holds the first part");
        for chain in chunk {
            part.remove(chain);
        }
    }
    parts.retain(|p| !p.is_empty());
    (removed, parts)
}

/// Removes every rule and chain this mode creates, in both families, in
/// both iptables backends, and in the nat and filter tables: the jumps from
/// the built-in chains first, then our chains, flushed and deleted. Returns
/// whether there was anything. Safe to run twice. The names are
/// kube-proxy's, so this is also [`cleanup_kube_proxy`].
pub fn cleanup() -> Result<bool, IptablesError> {
    cleanup_kube_proxy()
}

/// Removes what kube-proxy's iptables mode leaves: its `KUBE-*` chains of
/// the nat, filter and mangle tables (the per-service ones by prefix) and
/// the jumps to them, through both backends (a node may have moved from one
/// to the other). Since this mode uses kube-proxy's names, this is what
/// [`cleanup`] does as well. A node without iptables has nothing to remove.
pub fn cleanup_kube_proxy() -> Result<bool, IptablesError> {
    cleanup_backends(&IptablesBackend::ALL)
}

/// [`cleanup_kube_proxy`] through `backends` only.
pub fn cleanup_backends(backends: &[IptablesBackend]) -> Result<bool, IptablesError> {
    let mut any = false;
    for &backend in backends {
        for family in [Family::V4, Family::V6] {
            let mut restores: Vec<String> = Vec::new();
            for (table, chains) in KUBE_PROXY_CHAINS {
                let saved = save(backend, family, table, true)?;
                let mut ours: BTreeSet<String> = chains.iter().map(|c| c.to_string()).collect();
                if table == "nat" {
                    ours.extend(
                        saved
                            .chains
                            .keys()
                            .filter(|c| FRONTEND_PREFIXES.iter().any(|p| c.starts_with(p)))
                            .cloned(),
                    );
                }
                let limit = backend.chains_per_restore();
                let (removed, parts) = cleanup_input(table, &saved, &ours, limit);
                any |= removed > 0;
                for (i, part) in parts.iter().enumerate() {
                    if restores.len() <= i {
                        restores.push(String::new());
                    }
                    part.write(table, &mut restores[i]);
                }
            }
            for text in restores {
                restore(backend, family, &text)?;
            }
        }
    }
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        FrontendChange, FrontendKind,
        test_support::{backend, frontend, ip, key, key_proto},
    };

    fn network() -> NodeNetwork {
        NodeNetwork {
            nodeport_addresses: [ip("198.18.0.1"), ip("2001:2::1")].into_iter().collect(),
            cluster_cidrs: vec![
                "198.18.1.0/24".parse().unwrap(),
                "2001:2::1:0/112".parse().unwrap(),
            ],
            ..NodeNetwork::default()
        }
    }

    fn dataplane() -> IptablesDataplane {
        IptablesDataplane {
            network: network(),
            ..IptablesDataplane::new(IptablesBackend::Nft)
        }
    }

    fn external(kind: FrontendKind, backends: &[Backend]) -> Frontend {
        let mut f = frontend("ns", "web", backends);
        f.kind = kind;
        f.port_name = "http".into();
        f
    }

    fn local(kind: FrontendKind, local: &[Backend], all: &[Backend]) -> Frontend {
        let mut f = external(kind, local);
        f.policy.local_only = true;
        f.cluster_backends = all.to_vec();
        f
    }

    /// The restores of a diff applied to `dp` (nothing runs).
    fn restores_of(
        dp: &IptablesDataplane,
        diff: &TableDiff,
        family: Family,
        top: TopLevel,
    ) -> Vec<String> {
        let (keys, wanted) = dp.wanted_of(diff);
        let none = BTreeSet::new();
        dp.restores(family, &keys, &wanted, top, &none, &none)
            .iter()
            .map(RestoreInput::text)
            .collect()
    }

    /// The restore text of a diff applied to `dp`, the top-level chains
    /// rewritten whole (so they can be read in the text).
    fn restore_text(dp: &IptablesDataplane, diff: &TableDiff, family: Family) -> String {
        restores_of(dp, diff, family, TopLevel::Rewrite).concat()
    }

    fn added(frontends: &[(FrontendKey, Frontend)]) -> TableDiff {
        TableDiff {
            added: frontends.to_vec(),
            ..TableDiff::default()
        }
    }

    /// The rules of `chain` in `table` of a restore text (after `-A chain `).
    fn rules<'a>(text: &'a str, table: &str, chain: &str) -> Vec<&'a str> {
        let prefix = format!("-A {chain} ");
        let mut in_table = false;
        let mut out = Vec::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                in_table = t == table;
            } else if in_table && let Some(rule) = line.strip_prefix(prefix.as_str()) {
                out.push(rule);
            }
        }
        out
    }

    fn declared(text: &str) -> BTreeSet<&str> {
        text.lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .collect()
    }

    const C: &str = "-m comment --comment \"ns/web:http\"";

    #[test]
    fn cluster_ip_with_three_endpoints_cascades_with_kube_proxys_probabilities() {
        let dp = dataplane();
        let k = key("198.19.0.10", 80);
        let bs = [
            backend("198.18.1.10", 8080),
            backend("198.18.1.11", 8080),
            backend("198.18.1.12", 8080),
        ];
        let text = restore_text(
            &dp,
            &added(&[(k, external(FrontendKind::ClusterIp, &bs))]),
            Family::V4,
        );
        let svc = svc_chain(&k);
        let seps: Vec<String> = bs.iter().map(|b| sep_chain(&k, b)).collect();
        assert_eq!(
            rules(&text, "nat", &svc),
            vec![
                format!("{C} ! -s 198.18.1.0/24 -j KUBE-MARK-MASQ"),
                format!(
                    "{C} -m statistic --mode random --probability 0.3333333333 -j {}",
                    seps[0]
                ),
                format!(
                    "{C} -m statistic --mode random --probability 0.5000000000 -j {}",
                    seps[1]
                ),
                format!("{C} -j {}", seps[2]),
            ]
        );
        assert_eq!(
            rules(&text, "nat", &seps[1]),
            vec![
                format!("{C} -s 198.18.1.11/32 -j KUBE-MARK-MASQ"),
                format!("{C} -p tcp -m tcp -j DNAT --to-destination 198.18.1.11:8080"),
            ]
        );
        assert_eq!(
            rules(&text, "nat", SERVICES_CHAIN),
            vec![
                format!("{C} -d 198.19.0.10/32 -p tcp -m tcp --dport 80 -j {svc}"),
                "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d 198.18.0.1/32 -j KUBE-NODEPORTS".to_string(),
            ]
        );
        // Nothing refuses: the filter chains are declared (rewritten) empty.
        for chain in [SERVICES_CHAIN, EXTERNAL_SERVICES_CHAIN, FIREWALL_CHAIN] {
            assert!(rules(&text, "filter", chain).is_empty(), "{chain}: {text}");
        }
        assert!(
            text.starts_with("*nat\n")
                && text.contains("COMMIT\n*filter\n")
                && text.ends_with("COMMIT\n")
        );
        assert!(!text.contains("-X "), "{text}");
    }

    #[test]
    fn session_affinity_checks_every_endpoint_before_the_cascade() {
        let dp = dataplane();
        let k = key_proto("198.19.0.10", 53, Protocol::Udp);
        let bs = [backend("198.18.1.10", 5353), backend("198.18.1.11", 5353)];
        let mut f = external(FrontendKind::ClusterIp, &bs);
        f.policy.affinity_timeout_secs = Some(10800);
        let text = restore_text(&dp, &added(&[(k, f)]), Family::V4);
        let s0 = sep_chain(&k, &bs[0]);
        let s1 = sep_chain(&k, &bs[1]);
        assert_eq!(
            rules(&text, "nat", &svc_chain(&k))[1..],
            [
                format!(
                    "{C} -m recent --name {s0} --rcheck --seconds 10800 --reap --rsource -j {s0}"
                ),
                format!(
                    "{C} -m recent --name {s1} --rcheck --seconds 10800 --reap --rsource -j {s1}"
                ),
                format!("{C} -m statistic --mode random --probability 0.5000000000 -j {s0}"),
                format!("{C} -j {s1}"),
            ]
        );
        assert_eq!(
            rules(&text, "nat", &s1)[1],
            format!(
                "{C} -p udp -m recent --name {s1} --set --rsource -m udp -j DNAT --to-destination 198.18.1.11:5353"
            )
        );
    }

    #[test]
    fn local_policy_short_circuits_pods_and_drops_others_without_a_local_endpoint() {
        let dp = dataplane();
        let k = key("198.19.2.10", 80);
        let remote = [backend("198.18.1.224", 8080)];
        let text = restore_text(
            &dp,
            &added(&[(k, local(FrontendKind::LoadBalancer, &[], &remote))]),
            Family::V4,
        );
        let ext = ext_chain(&k);
        // Pods go to every endpoint; the others are not translated...
        assert_eq!(
            rules(&text, "nat", &ext),
            vec![format!("{C} -s 198.18.1.0/24 -j {}", svc_chain(&k))]
        );
        assert!(!declared(&text).contains(svl_chain(&k).as_str()));
        assert_eq!(rules(&text, "nat", &svc_chain(&k)).len(), 1, "{text}");
        assert_eq!(
            rules(&text, "nat", SERVICES_CHAIN)[0],
            format!("{C} -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j {ext}")
        );
        // ...and dropped by the filter table (non-pods only).
        assert_eq!(
            rules(&text, "filter", EXTERNAL_SERVICES_CHAIN),
            vec![format!(
                "{C} ! -s 198.18.1.0/24 -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j DROP"
            )]
        );
        // With a local endpoint: the others use it, unmasqueraded.
        let here = [backend("198.18.1.10", 8080)];
        let all = [here[0], remote[0]];
        let text = restore_text(
            &dp,
            &added(&[(k, local(FrontendKind::LoadBalancer, &here, &all))]),
            Family::V4,
        );
        assert_eq!(
            rules(&text, "nat", &ext),
            vec![
                format!("{C} -s 198.18.1.0/24 -j {}", svc_chain(&k)),
                format!("{C} -j {}", svl_chain(&k)),
            ]
        );
        assert_eq!(
            rules(&text, "nat", &svl_chain(&k)),
            vec![format!("{C} -j {}", sep_chain(&k, &here[0]))]
        );
        assert_eq!(rules(&text, "nat", &svc_chain(&k)).len(), 2);
        assert!(rules(&text, "filter", EXTERNAL_SERVICES_CHAIN).is_empty());
    }

    #[test]
    fn frontends_without_endpoints_are_not_translated_and_rejected_in_filter() {
        let dp = dataplane();
        let tcp = key("198.19.0.10", 80);
        let udp = key_proto("198.19.0.10", 53, Protocol::Udp);
        let np = key("0.0.0.0", 30080);
        let ext = key("198.19.1.10", 80);
        let text = restore_text(
            &dp,
            &added(&[
                (tcp, external(FrontendKind::ClusterIp, &[])),
                (udp, external(FrontendKind::ClusterIp, &[])),
                (np, external(FrontendKind::NodePort, &[])),
                (ext, external(FrontendKind::ExternalIp, &[])),
            ]),
            Family::V4,
        );
        assert_eq!(
            declared(&text),
            [
                SERVICES_CHAIN,
                NODEPORTS_CHAIN,
                EXTERNAL_SERVICES_CHAIN,
                FIREWALL_CHAIN
            ]
            .into_iter()
            .collect()
        );
        assert!(rules(&text, "nat", NODEPORTS_CHAIN).is_empty());
        assert_eq!(
            rules(&text, "nat", SERVICES_CHAIN).len(),
            1,
            "only the NodePort jump: {text}"
        );
        assert_eq!(
            rules(&text, "filter", SERVICES_CHAIN),
            vec![
                format!("{C} -d 198.19.0.10/32 -p udp -m udp --dport 53 -j REJECT"),
                format!(
                    "{C} -d 198.19.0.10/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset"
                ),
                format!(
                    "{C} -d 198.19.1.10/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset"
                ),
            ]
        );
        assert_eq!(
            rules(&text, "filter", EXTERNAL_SERVICES_CHAIN),
            vec![format!(
                "{C} -d 198.18.0.1/32 -p tcp -m tcp --dport 30080 -j REJECT --reject-with tcp-reset"
            )]
        );
    }

    #[test]
    fn internal_local_policy_without_a_local_endpoint_drops() {
        let dp = dataplane();
        let k = key("198.19.0.10", 80);
        let mut f = external(FrontendKind::ClusterIp, &[]);
        f.policy.local_only = true;
        f.cluster_backends = vec![backend("198.18.1.224", 8080)];
        let text = restore_text(&dp, &added(&[(k, f)]), Family::V4);
        assert_eq!(
            rules(&text, "filter", SERVICES_CHAIN),
            vec![format!(
                "{C} -d 198.19.0.10/32 -p tcp -m tcp --dport 80 -j DROP"
            )]
        );
        assert!(!declared(&text).contains(svc_chain(&k).as_str()));
    }

    #[test]
    fn source_ranges_admit_through_the_fw_chain_and_the_firewall_drops_the_rest() {
        let dp = dataplane();
        let k = key("198.19.2.10", 80);
        let mut f = external(FrontendKind::LoadBalancer, &[backend("198.18.1.10", 8080)]);
        f.policy.source_ranges = vec![
            "203.0.113.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let text = restore_text(&dp, &added(&[(k, f.clone())]), Family::V4);
        let (fw, ext) = (fw_chain(&k), ext_chain(&k));
        assert_eq!(
            rules(&text, "nat", SERVICES_CHAIN)[0],
            format!("{C} -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j {fw}")
        );
        assert_eq!(
            rules(&text, "nat", &fw),
            vec![
                format!("{C} -s 203.0.113.0/24 -j {ext}"),
                "-m comment --comment \"other traffic to ns/web:http will be dropped by KUBE-PROXY-FIREWALL\"".to_string(),
            ]
        );
        assert_eq!(
            rules(&text, "nat", &ext),
            vec![
                format!("{C} ! -s 198.18.1.0/24 -j KUBE-MARK-MASQ"),
                format!("{C} -j {}", svc_chain(&k))
            ]
        );
        assert_eq!(
            rules(&text, "filter", FIREWALL_CHAIN),
            vec![format!(
                "-m comment --comment \"ns/web:http traffic not accepted by {fw}\" -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j DROP"
            )]
        );
        // Without endpoints, admitted sources are rejected, the others dropped.
        f.backends.clear();
        let text = restore_text(&dp, &added(&[(k, f)]), Family::V4);
        assert_eq!(
            rules(&text, "filter", FIREWALL_CHAIN),
            vec![
                format!(
                    "{C} -s 203.0.113.0/24 -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j RETURN"
                ),
                format!(
                    "-m comment --comment \"ns/web:http traffic not accepted by {fw}\" -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j DROP"
                ),
            ]
        );
        assert_eq!(
            rules(&text, "filter", SERVICES_CHAIN),
            vec![format!(
                "{C} -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset"
            )]
        );
    }

    #[test]
    fn node_ports_enter_through_kube_nodeports_on_the_nodeport_addresses_only() {
        let mut dp = dataplane();
        dp.network.nodeport_addresses.insert(ip("127.0.0.1"));
        let k = key_proto("0.0.0.0", 30053, Protocol::Udp);
        let b = backend("198.18.1.10", 5353);
        let text = restore_text(
            &dp,
            &added(&[(k, external(FrontendKind::NodePort, &[b]))]),
            Family::V4,
        );
        let ext = ext_chain(&k);
        assert_eq!(
            rules(&text, "nat", NODEPORTS_CHAIN),
            vec![format!("{C} -p udp -m udp --dport 30053 -j {ext}")]
        );
        assert_eq!(
            rules(&text, "nat", &ext),
            vec![
                format!("{C} ! -s 198.18.1.0/24 -j KUBE-MARK-MASQ"),
                format!("{C} -s 127.0.0.0/8 -j KUBE-MARK-MASQ"),
                format!("{C} -j {}", svc_chain(&k)),
            ]
        );
        let jumps: Vec<&str> = rules(&text, "nat", SERVICES_CHAIN);
        assert_eq!(jumps.len(), 2);
        assert!(
            jumps[0].ends_with("-d 127.0.0.1/32 -j KUBE-NODEPORTS")
                && jumps[1].ends_with("-d 198.18.0.1/32 -j KUBE-NODEPORTS")
        );
        assert!(!text.contains("addrtype"), "{text}");
    }

    #[test]
    fn ipv6_frontends_render_with_bracketed_destinations() {
        let dp = dataplane();
        let k = key("2001:2:0:ff::10", 80);
        let b = backend("2001:2::1:a", 8080);
        let np = key("::", 30080);
        let diff = added(&[
            (k, external(FrontendKind::ClusterIp, &[b])),
            (np, external(FrontendKind::NodePort, &[])),
        ]);
        let text = restore_text(&dp, &diff, Family::V6);
        assert_eq!(
            rules(&text, "nat", &sep_chain(&k, &b)),
            vec![
                format!("{C} -s 2001:2::1:a/128 -j KUBE-MARK-MASQ"),
                format!("{C} -p tcp -m tcp -j DNAT --to-destination [2001:2::1:a]:8080"),
            ]
        );
        assert_eq!(
            rules(&text, "nat", &svc_chain(&k)),
            vec![
                format!("{C} ! -s 2001:2::1:0/112 -j KUBE-MARK-MASQ"),
                format!("{C} -j {}", sep_chain(&k, &b))
            ]
        );
        assert!(
            rules(&text, "nat", SERVICES_CHAIN)[1].ends_with("-d 2001:2::1/128 -j KUBE-NODEPORTS")
        );
        assert_eq!(
            rules(&text, "filter", EXTERNAL_SERVICES_CHAIN),
            vec![format!(
                "{C} -d 2001:2::1/128 -p tcp -m tcp --dport 30080 -j REJECT --reject-with tcp-reset"
            )]
        );
        // IPv4 is another restore: nothing of these in it.
        assert!(!restore_text(&dp, &diff, Family::V4).contains("2001:"));
    }

    #[test]
    fn chain_names_are_stable_and_short() {
        let k = key("198.19.0.10", 80);
        let b = backend("198.18.1.10", 8080);
        // Names persist in the kernel across restarts and upgrades: these
        // values must never change. (Computed independently: FNV-1a 128 of
        // "tcp/198.19.0.10/80", FNV-1a 128 of its 16 big-endian bytes, top
        // 80 bits in RFC 4648 base32.)
        assert_eq!(svc_chain(&k), "KUBE-SVC-DEKHJ2P7TAIRGTG7");
        assert_eq!(sep_chain(&k, &b), "KUBE-SEP-3OAMRHB65YO446FJ");
        for name in [
            svc_chain(&k),
            svl_chain(&k),
            ext_chain(&k),
            fw_chain(&k),
            sep_chain(&k, &b),
        ] {
            assert!(name.len() <= MAX_CHAIN_NAME, "{name}");
        }
        let k6 = key_proto(
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            65535,
            Protocol::Sctp,
        );
        let b6 = backend("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535);
        assert!(sep_chain(&k6, &b6).len() <= MAX_CHAIN_NAME);
        // Distinct for neighbours.
        let names: BTreeSet<String> = (0..=255u8)
            .flat_map(|i| {
                let k = key(&format!("198.19.0.{i}"), 80);
                let other = backend("198.18.2.1", 9090);
                [
                    svc_chain(&k),
                    sep_chain(&k, &backend(&format!("198.18.1.{i}"), 8080)),
                    sep_chain(&k, &other),
                ]
            })
            .collect();
        assert_eq!(names.len(), 3 * 256);
        assert!(
            hash16("x")
                .chars()
                .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c))
        );
    }

    #[test]
    fn a_partial_restore_holds_only_the_changed_chains_and_edits_of_the_top_level() {
        let mut dp = dataplane();
        let a = key("198.19.0.10", 80);
        let b = key("198.19.0.11", 80);
        let a0 = [backend("198.18.1.10", 8080), backend("198.18.1.11", 8080)];
        let b0 = [backend("198.18.1.12", 8080)];
        for (k, bs) in [(a, &a0[..]), (b, &b0[..])] {
            let p = dp.program(&k, &external(FrontendKind::ClusterIp, bs));
            dp.programmed.insert(k, p);
        }
        // a loses an endpoint: its entry in KUBE-SERVICES stays as it is.
        let diff = TableDiff {
            changed: vec![FrontendChange {
                key: a,
                old: external(FrontendKind::ClusterIp, &a0),
                new: external(FrontendKind::ClusterIp, &a0[..1]),
            }],
            ..TableDiff::default()
        };
        let texts = restores_of(&dp, &diff, Family::V4, TopLevel::Edit);
        assert_eq!(texts.len(), 1, "one restore: {texts:?}");
        let text = &texts[0];
        let gone = sep_chain(&a, &a0[1]);
        assert_eq!(
            declared(text),
            [svc_chain(&a).as_str(), &gone].into_iter().collect(),
            "only a's changed chain and the chain it deletes: {text}"
        );
        assert!(!text.contains("KUBE-SERVICES"), "{text}");
        assert!(text.contains(&format!("-X {gone}\nCOMMIT\n")), "{text}");
        // Removing b deletes its entry by its text, then its chains.
        let entry = dp.programmed[&b].top[&("nat", SERVICES_CHAIN)][0].clone();
        let diff = TableDiff {
            removed: vec![(b, external(FrontendKind::ClusterIp, &b0))],
            ..TableDiff::default()
        };
        let texts = restores_of(&dp, &diff, Family::V4, TopLevel::Edit);
        let text = &texts[0];
        assert!(
            text.contains(&format!("-D KUBE-SERVICES {entry}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("-X {}\n", svc_chain(&b)))
                && text.contains(&format!("-X {}\n", sep_chain(&b, &b0[0])))
        );
        // A new ClusterIP is inserted at the top, before the NodePort jump.
        let c = key("198.19.0.12", 80);
        let texts = restores_of(
            &dp,
            &added(&[(c, external(FrontendKind::ClusterIp, &b0))]),
            Family::V4,
            TopLevel::Edit,
        );
        assert!(
            texts[0].contains(&format!(
                "-I KUBE-SERVICES 1 {C} -d 198.19.0.12/32 -p tcp -m tcp --dport 80 -j {}\n",
                svc_chain(&c)
            )),
            "{}",
            texts[0]
        );
        // Rewritten whole, KUBE-SERVICES holds every entry and the NodePort
        // jump last.
        let text = restore_text(&dp, &diff, Family::V4);
        let services = rules(&text, "nat", SERVICES_CHAIN);
        assert_eq!(services.len(), 2, "{text}");
        assert!(services[1].ends_with("-j KUBE-NODEPORTS"));
    }

    #[test]
    fn a_large_write_creates_chains_in_chunks_then_enters_them_then_deletes_by_rank() {
        let mut dp = dataplane();
        // Enough frontends that their chains (a KUBE-SVC and two KUBE-SEP
        // each) exceed one restore.
        let n = CHAINS_PER_RESTORE / 3 + 10;
        let bs = [backend("198.18.1.10", 8080), backend("198.18.1.11", 8080)];
        let frontends: Vec<(FrontendKey, Frontend)> = (0..n)
            .map(|i| {
                let ip = format!("198.19.{}.{}", i / 200, i % 200 + 1);
                (key(&ip, 80), external(FrontendKind::ClusterIp, &bs))
            })
            .collect();
        let texts = restores_of(&dp, &added(&frontends), Family::V4, TopLevel::Edit);
        // Two of chains (no top-level chain in them), then the top level.
        assert_eq!(texts.len(), 3);
        for text in &texts[..2] {
            assert!(declared(text).len() <= CHAINS_PER_RESTORE);
            assert!(!text.contains("KUBE-SERVICES"));
            // A frontend's chains stay together: every SEP a SVC jumps to
            // is declared in the same restore.
            let targets = text
                .lines()
                .filter_map(|l| l.strip_prefix("-A KUBE-SVC-"))
                .filter_map(target_of)
                .filter(|t| t.starts_with("KUBE-SEP-"));
            for target in targets {
                assert!(declared(text).contains(target), "{target}");
            }
        }
        let top = &texts[2];
        assert_eq!(declared(top), BTreeSet::new(), "{top}");
        assert_eq!(
            top.lines()
                .filter(|l| l.starts_with("-I KUBE-SERVICES 1 "))
                .count(),
            n
        );
        // Remove them all: KUBE-SERVICES is rewritten whole (more deletes
        // than TOP_LEVEL_DELETES), then the chains go, SVCs before SEPs.
        for (k, f) in &frontends {
            let p = dp.program(k, f);
            dp.programmed.insert(*k, p);
        }
        let diff = TableDiff {
            removed: frontends.clone(),
            ..TableDiff::default()
        };
        let texts = restores_of(&dp, &diff, Family::V4, TopLevel::Edit);
        assert!(texts[0].contains(":KUBE-SERVICES - [0:0]"), "{}", texts[0]);
        assert_eq!(
            rules(&texts[0], "nat", SERVICES_CHAIN).len(),
            1,
            "the NodePort jump"
        );
        // Per restore, the ranks of what it deletes: no restore deletes a
        // chain of a lower rank than one an earlier restore deleted.
        let ranks: Vec<(u8, u8)> = texts[1..]
            .iter()
            .map(|t| {
                let r: Vec<u8> = t
                    .lines()
                    .filter_map(|l| l.strip_prefix("-X "))
                    .map(deletion_rank)
                    .collect();
                (*r.iter().min().unwrap(), *r.iter().max().unwrap())
            })
            .collect();
        assert!(ranks.len() >= 2, "{ranks:?}");
        assert!(ranks.windows(2).all(|w| w[0].1 <= w[1].0), "{ranks:?}");
        let deleted: usize = texts.iter().map(|t| t.matches("\n-X ").count()).sum();
        assert_eq!(deleted, 3 * n);
        // The legacy backend does it all in one restore.
        dp.backend = IptablesBackend::Legacy;
        assert_eq!(restores_of(&dp, &diff, Family::V4, TopLevel::Edit).len(), 1);
    }

    /// `iptables-nft -t nat -S` of this namespace, our chains only.
    fn nat_rules() -> Vec<String> {
        let out = Command::new("iptables-nft")
            .args(["-t", "nat", "-S"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("KUBE-"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn large_writes_and_reconciles_in_the_kernel_keep_the_table_whole() {
        crate::dataplane::in_private_netns(|| {
            if Command::new("iptables-nft").arg("-V").output().is_err() {
                eprintln!("skipped: no iptables-nft");
                return;
            }
            let mut dp = IptablesDataplane::new(IptablesBackend::Nft);
            dp.set_network(&network()).unwrap();
            // More chains than one restore holds: three per frontend.
            let n = CHAINS_PER_RESTORE / 3 + 10;
            let bs = [backend("198.18.1.10", 8080), backend("198.18.1.11", 8080)];
            let mut table = ServiceTable::new();
            for i in 0..n {
                let ip = format!("198.19.{}.{}", i / 200, i % 200 + 1);
                table.insert(key(&ip, 80), external(FrontendKind::ClusterIp, &bs));
            }
            dp.reconcile_table(&table).unwrap();
            let services = |rules: &[String]| {
                rules
                    .iter()
                    .filter(|r| r.starts_with("-A KUBE-SERVICES "))
                    .count()
            };
            let rules = nat_rules();
            // One entry per frontend and the NodePort jump.
            assert_eq!(services(&rules), n + 1);
            assert_eq!(
                rules
                    .iter()
                    .filter(|r| r.starts_with("-N KUBE-SEP-"))
                    .count(),
                2 * n
            );

            // Nothing changed: a reconcile writes nothing.
            let stats = dp.reconcile_table(&table).unwrap();
            assert_eq!(stats, ApplyStats::default());
            assert_eq!(nat_rules(), rules);

            // An entry deleted by hand is drift: the reconcile puts it back.
            let entry = rules
                .iter()
                .find(|r| r.starts_with("-A KUBE-SERVICES ") && r.contains("198.19.0.1/32"))
                .unwrap()
                .replacen("-A ", "-D ", 1);
            let args: Vec<&str> = ["-t", "nat"]
                .into_iter()
                .chain(shell_words(&entry))
                .collect();
            assert!(
                Command::new("iptables-nft")
                    .args(&args)
                    .status()
                    .unwrap()
                    .success()
            );
            let stats = dp.reconcile_table(&table).unwrap();
            assert!(stats.map_writes > 0, "{stats:?}");
            assert_eq!(services(&nat_rules()), n + 1);

            // Removing every frontend at once deletes their chains (in
            // restores ordered so that no chain is still jumped to).
            let diff = TableDiff {
                removed: table.iter().map(|(k, f)| (*k, f.clone())).collect(),
                ..TableDiff::default()
            };
            dp.apply_diff(&diff).unwrap();
            let rules = nat_rules();
            assert_eq!(services(&rules), 1, "{:?}", &rules[..rules.len().min(5)]);
            assert!(
                !rules
                    .iter()
                    .any(|r| r.contains("KUBE-SEP-") || r.contains("KUBE-SVC-"))
            );
            assert!(cleanup().unwrap());
            assert_eq!(nat_rules(), Vec::<String>::new());
        });
    }

    /// Splits a rule as a shell would (words, double quotes).
    fn shell_words(line: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut rest = line.trim();
        while !rest.is_empty() {
            if let Some(quoted) = rest.strip_prefix('"') {
                let end = quoted.find('"').unwrap();
                out.push(&quoted[..end]);
                rest = quoted[end + 1..].trim_start();
            } else {
                let end = rest.find(' ').unwrap_or(rest.len());
                out.push(&rest[..end]);
                rest = rest[end..].trim_start();
            }
        }
        out
    }

    #[test]
    fn the_backend_is_the_one_kubelet_marked_else_the_one_with_more_rules() {
        let choose = |nft: Option<&str>, legacy: Option<&str>| {
            IptablesBackend::choose(&[nft.map(str::to_string), legacy.map(str::to_string)])
        };
        let hint = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        let canary = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
        let rules = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\nCOMMIT\n";
        let one = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        use IptablesBackend::{Legacy, Nft};
        // kubelet's marker chains decide, whatever the rule counts.
        assert_eq!(choose(Some(hint), Some(rules)), Nft);
        assert_eq!(choose(Some(rules), Some(canary)), Legacy);
        assert_eq!(choose(Some(hint), Some(canary)), Nft);
        // Else the one with more rules; nft on a tie.
        assert_eq!(choose(Some(one), Some(rules)), Legacy);
        assert_eq!(choose(Some(rules), Some(one)), Nft);
        assert_eq!(choose(Some(""), Some("")), Nft);
        // Only one installed: that one.
        assert_eq!(choose(None, Some("")), Legacy);
        assert_eq!(choose(Some(""), None), Nft);
        assert_eq!(choose(None, None), Nft);
    }

    #[test]
    fn base_input_adds_missing_jumps_in_order_and_removes_extra_copies() {
        let nat = Saved::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A PREROUTING -j KUBE-SERVICES\nCOMMIT\n",
        );
        let mut input = RestoreInput::default();
        let (writes, deletes) = base_input(&mut input, &nat, &Saved::default(), false);
        // OUTPUT and POSTROUTING in nat, 9 in filter; one copy too many.
        assert_eq!((writes, deletes), (11, 1));
        let text = input.text();
        assert!(text.contains("-D PREROUTING -j KUBE-SERVICES\n"), "{text}");
        assert!(
            !text.contains(":KUBE-SERVICES - [0:0]\n-A"),
            "an existing KUBE-SERVICES is not flushed: {text}"
        );
        let filter: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-I INPUT 1"))
            .collect();
        assert_eq!(filter.len(), 3);
        assert!(
            filter[0].ends_with("-j KUBE-EXTERNAL-SERVICES")
                && filter[2].ends_with("-j KUBE-PROXY-FIREWALL")
        );
        assert!(text.contains("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n"));
        assert!(text.contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n"));
        assert!(text.contains("-j MASQUERADE --random-fully\n"));
    }

    #[test]
    fn cleanup_deletes_jumps_then_chains_and_keeps_what_a_foreign_chain_uses() {
        let saved = Saved::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAA - [0:0]\n:CNI-X - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A PREROUTING -j CNI-X\n-A CNI-X -j KUBE-MARK-MASQ\n-A KUBE-SERVICES -j KUBE-SVC-AAAA\nCOMMIT\n",
        );
        let ours: BTreeSet<String> = [
            "KUBE-SERVICES",
            "KUBE-SVC-AAAA",
            "KUBE-MARK-MASQ",
            "KUBE-NODEPORTS",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        // KUBE-MARK-MASQ is used by CNI-X, and empty already: left alone.
        let (removed, parts) = cleanup_input("nat", &saved, &ours, CHAINS_PER_RESTORE);
        assert_eq!(removed, 3);
        assert_eq!(parts.len(), 1);
        let mut text = String::new();
        parts[0].write("nat", &mut text);
        assert_eq!(
            text,
            "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAA - [0:0]\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -X KUBE-SERVICES\n-X KUBE-SVC-AAAA\nCOMMIT\n"
        );
        // Nothing left: nothing to do.
        let (removed, parts) = cleanup_input("nat", &Saved::default(), &ours, CHAINS_PER_RESTORE);
        assert_eq!(removed, 0);
        assert!(parts.is_empty());
    }

    #[test]
    fn refusals_carry_stderr_and_the_offending_line() {
        let input = "*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j NOPE\nCOMMIT\n";
        let stderr = "iptables-restore v1.8.9 (nf_tables): Chain 'NOPE' does not exist\nError occurred at line: 3\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.\n";
        match refusal("iptables-restore", stderr, input) {
            IptablesError::Refused {
                stderr, line, text, ..
            } => {
                assert_eq!(line, Some(3));
                assert_eq!(text.as_deref(), Some("-A KUBE-A -j NOPE"));
                assert!(stderr.contains("Chain 'NOPE' does not exist") && !stderr.contains("Try"));
            }
            other => panic!("{other:?}"),
        }
        let legacy = refusal(
            "iptables-restore",
            "iptables-restore: line 99 failed\n",
            input,
        );
        assert!(
            matches!(
                legacy,
                IptablesError::Refused {
                    line: Some(99),
                    text: None,
                    ..
                }
            ),
            "{legacy:?}"
        );
        assert!(matches!(
            refusal("x", "", input),
            IptablesError::Refused { line: None, .. }
        ));
        assert!(legacy.to_string().contains("at line 99"));
    }

    #[test]
    fn saved_tables_parse_into_chains_and_rules() {
        let saved = Saved::parse(
            "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SEP-X - [0:0]\n\
             -A KUBE-SEP-X -p tcp -m comment --comment \"a b\" -j DNAT --to-destination 1.2.3.4:80\nCOMMIT\n",
        );
        assert_eq!(saved.rules("PREROUTING").len(), 0);
        assert!(saved.has("PREROUTING"));
        assert_eq!(target_of(&saved.rules("KUBE-SEP-X")[0]), Some("DNAT"));
        assert_eq!(target_of("-m mark --mark 1 -g KUBE-X"), Some("KUBE-X"));
    }
}
