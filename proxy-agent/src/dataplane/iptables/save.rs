//! Reading what iptables prints: a table as `iptables-save` (or `iptables
//! -S`) shows it, parsed into chains and rules.
use std::collections::{BTreeMap, BTreeSet};

/// One table as iptables-save prints it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Saved {
    /// Every chain (built-in ones included) and its rules, each the text
    /// after `-A <chain> `.
    pub(super) chains: BTreeMap<String, Vec<String>>,
}

impl Saved {
    pub(super) fn parse(text: &str) -> Saved {
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

    pub(super) fn has(&self, chain: &str) -> bool {
        self.chains.contains_key(chain)
    }

    pub(super) fn rules(&self, chain: &str) -> &[String] {
        self.chains.get(chain).map_or(&[], Vec::as_slice)
    }

    /// The targets of rules in chains that `ours` does not claim (built-in
    /// chains included).
    pub(super) fn foreign_references(&self, ours: impl Fn(&String) -> bool) -> BTreeSet<&str> {
        self.chains
            .iter()
            .filter(|(chain, _)| !ours(chain))
            .flat_map(|(_, rules)| rules.iter().filter_map(|r| target_of(r)))
            .collect()
    }
}

/// The jump target of a rule's text (`-j X` or `-g X`).
pub(super) fn target_of(spec: &str) -> Option<&str> {
    let mut words = spec.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" || w == "--jump" || w == "--goto" {
            return words.next();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
