//! `kube-ipvs0`: the dummy interface holding every address IPVS serves
//! besides the node's own (ClusterIPs, external and LoadBalancer IPs), so
//! the kernel takes their packets as local and IPVS's input hook sees
//! them. Written with `ip -batch`, one process per change however many
//! addresses it holds; left down, as kube-proxy leaves it.
use std::{collections::BTreeSet, net::IpAddr, process::Command};

use crate::dataplane::netfilter::run_with_input;

pub const LINK: &str = "kube-ipvs0";

/// What `ip` failed with.
#[derive(Debug, thiserror::Error)]
#[error("ip {what}: {detail}")]
pub struct LinkError {
    what: String,
    detail: String,
}

fn ip(args: &[&str]) -> Result<String, LinkError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| LinkError {
            what: args.join(" "),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LinkError {
            what: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the link exists.
pub fn exists() -> bool {
    ip(&["link", "show", "dev", LINK]).is_ok()
}

/// Creates the link unless it exists.
pub fn ensure() -> Result<(), LinkError> {
    if exists() {
        return Ok(());
    }
    ip(&["link", "add", LINK, "type", "dummy"]).map(|_| ())
}

/// Deletes the link (and every address on it); whether it existed.
pub fn delete() -> Result<bool, LinkError> {
    if !exists() {
        return Ok(false);
    }
    ip(&["link", "delete", LINK]).map(|_| true)
}

/// The addresses bound on the link (none if it does not exist).
pub fn addresses() -> Result<BTreeSet<IpAddr>, LinkError> {
    if !exists() {
        return Ok(BTreeSet::new());
    }
    let text = ip(&["-j", "address", "show", "dev", LINK])?;
    Ok(parse_addresses(&text))
}

fn parse_addresses(json: &str) -> BTreeSet<IpAddr> {
    let Ok(links) = serde_json::from_str::<Vec<serde_json::Value>>(json) else {
        return BTreeSet::new();
    };
    links
        .iter()
        .filter_map(|l| l["addr_info"].as_array())
        .flatten()
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect()
}

/// Binds `add` and unbinds `remove`, in one `ip -batch`.
pub fn change(add: &[IpAddr], remove: &[IpAddr]) -> Result<(), LinkError> {
    if add.is_empty() && remove.is_empty() {
        return Ok(());
    }
    let mut batch = String::new();
    for addr in remove {
        batch.push_str(&format!("address del {} dev {LINK}\n", host(*addr)));
    }
    for addr in add {
        // No duplicate address detection: nobody else holds a VIP.
        let extra = if addr.is_ipv6() { " nodad" } else { "" };
        batch.push_str(&format!("address add {} dev {LINK}{extra}\n", host(*addr)));
    }
    let out = run_with_input("ip", &["-force", "-batch", "-"], batch.as_bytes()).map_err(|e| {
        LinkError {
            what: "-batch".into(),
            detail: e.to_string(),
        }
    })?;
    if !out.status.success() {
        return Err(LinkError {
            what: "-batch (binding service addresses)".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn host(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_addresses_of_ip_json() {
        let json = r#"[{"ifindex":9,"ifname":"kube-ipvs0","addr_info":[
            {"family":"inet","local":"10.96.0.10","prefixlen":32},
            {"family":"inet6","local":"fd00::10","prefixlen":128}]}]"#;
        let addrs: Vec<String> = parse_addresses(json)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(addrs, vec!["10.96.0.10", "fd00::10"]);
        assert!(parse_addresses("not json").is_empty());
    }
}
