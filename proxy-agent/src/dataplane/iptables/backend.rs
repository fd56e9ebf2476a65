//! Running iptables: which backend (iptables-nft or iptables-legacy) the
//! mode writes through, `iptables-restore --noflush`, `iptables-save`, and
//! `iptables -S` of single chains.
use std::process::Command;

use super::{IptablesError, restore::CHAINS_PER_RESTORE, save::Saved};
use crate::dataplane::netfilter::{self, Family};

/// How long iptables-restore waits for the xtables lock (`-w`), seconds.
const LOCK_WAIT_SECS: &str = "5";

/// How many lines of iptables-restore's stderr an error keeps.
const STDERR_LINES: usize = 4;

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
    pub(super) fn chains_per_restore(self) -> usize {
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

    pub(super) fn save_binary(self, family: Family) -> &'static str {
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
pub(super) fn restore(
    backend: IptablesBackend,
    family: Family,
    input: &str,
) -> Result<(), IptablesError> {
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
pub(super) fn first_lines(stderr: &str) -> String {
    stderr
        .lines()
        .take(STDERR_LINES)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// `iptables-save -t <table>` of `family`, parsed. A missing binary reads
/// as an empty table when `missing_is_empty` (cleanup on a node without
/// iptables).
pub(super) fn save(
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
pub(super) fn list_chains(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
