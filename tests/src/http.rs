//! The agent's HTTP endpoints as the tests and benchmarks read them: a
//! minimal GET from inside a namespace, and one sample of `/metrics`.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::Context;

use crate::netns::in_netns;

/// GET `path` from `target`, from inside namespace `ns`: the status code
/// and the body.
pub fn get(ns: &str, target: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    let response = in_netns(ns, || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })??;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of `sample` (a metric name, with its labels as exposed, e.g.
/// `proxy_agent_applies_total{kind="full"}`) in a `/metrics` body; for a
/// bare name whose series all carry labels, the largest of them.
pub fn sample(metrics: &str, sample: &str) -> Option<f64> {
    let exact = metrics
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok());
    if exact.is_some() || sample.contains('{') {
        return exact;
    }
    // A bare name whose series carry labels (kube-proxy's `ip_family`,
    // one series per family with the same sync's value): the largest.
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(sample)?.strip_prefix('{'))
        .filter_map(|rest| rest.rsplit_once("} ")?.1.trim().parse::<f64>().ok())
        .reduce(f64::max)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sample_matches_the_whole_name_and_labels() {
        let body = "a_total 3\na_total_sum 9\nb{kind=\"x\"} 1.5\n";
        assert_eq!(super::sample(body, "a_total"), Some(3.0));
        assert_eq!(super::sample(body, "b{kind=\"x\"}"), Some(1.5));
        // A bare name of labelled series: the largest of them.
        assert_eq!(super::sample(body, "b"), Some(1.5));
        let families = "t{ip_family=\"IPv4\"} 7\nt{ip_family=\"IPv6\"} 9\n";
        assert_eq!(super::sample(families, "t"), Some(9.0));
        assert_eq!(super::sample(body, "c"), None);
    }
}
