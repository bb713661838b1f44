//! Which machines the nodes of the cluster are.
//!
//! A cache in a local temporary folder (or in memory) is invisible to the nodes of a real
//! cluster, but not when every node is this machine (a single-node cluster such as
//! `scripts/slurm-local`'s): then the jobs run here and see every local path.

use std::net::{IpAddr, ToSocketAddrs};

/// One node, from `scontrol -o show nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// `NodeAddr`: where slurmctld reaches the node (defaults to the name).
    pub addr: String,
}

/// Parses `scontrol -o show nodes` (one node a line, `Key=Value` words).
pub fn parse_nodes(text: &str) -> Vec<Node> {
    text.lines()
        .filter_map(|line| {
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k).map(str::to_string))
            };
            let name = field("NodeName=")?;
            let addr = field("NodeAddr=").unwrap_or_else(|| name.clone());
            Some(Node { name, addr })
        })
        .collect()
}

/// The addresses `host` resolves to (empty when it does not resolve).
fn addresses(host: &str) -> Vec<IpAddr> {
    (host, 0)
        .to_socket_addrs()
        .map(|a| a.map(|s| s.ip()).collect())
        .unwrap_or_default()
}

/// Whether `host` (a name or an address) is this machine: a loopback address, this
/// machine's host name (full or short), or a name that resolves only to addresses this
/// machine's host name resolves to.
pub fn is_this_machine(host: &str) -> bool {
    let me = meduet_cache::lease::host_name();
    let short = |h: &str| h.split('.').next().unwrap_or(h).to_ascii_lowercase();
    if host.eq_ignore_ascii_case(&me) || short(host) == short(&me) {
        return true;
    }
    let theirs = addresses(host);
    if theirs.is_empty() {
        return false;
    }
    if theirs.iter().all(IpAddr::is_loopback) {
        return true;
    }
    let mine = addresses(&me);
    theirs.iter().all(|a| a.is_loopback() || mine.contains(a))
}

/// Whether the cluster has nodes and every one of them is this machine.
pub fn all_on_this_machine(nodes: &[Node]) -> bool {
    !nodes.is_empty() && nodes.iter().all(|n| is_this_machine(&n.addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = "NodeName=localhost Arch=x86_64 CoresPerSocket=1 CPUAlloc=0 CPUTot=8 \
        NodeAddr=localhost NodeHostName=localhost Version=24.11.5 OS=Linux State=IDLE\n";
    // Documentation addresses (RFC 5737): never this machine's, and no name lookup.
    const CLUSTER: &str = "NodeName=gpu01 Arch=x86_64 CPUTot=64 NodeAddr=192.0.2.11 \
        NodeHostName=gpu01 State=IDLE\n\
        NodeName=gpu02 Arch=x86_64 CPUTot=64 NodeAddr=192.0.2.12 NodeHostName=gpu02 \
        State=MIXED\n";

    #[test]
    fn nodes_are_parsed_with_their_addresses() {
        let n = parse_nodes(CLUSTER);
        assert_eq!(n.len(), 2);
        assert_eq!(n[1].name, "gpu02");
        assert_eq!(n[1].addr, "192.0.2.12");
        assert_eq!(parse_nodes("NodeName=a State=IDLE")[0].addr, "a");
    }

    #[test]
    fn a_single_local_node_is_this_machine() {
        assert!(all_on_this_machine(&parse_nodes(LOCAL)));
        let me = meduet_cache::lease::host_name();
        let line = format!("NodeName=n1 NodeAddr={me} State=IDLE\nNodeName=n2 NodeAddr=127.0.0.1");
        assert!(all_on_this_machine(&parse_nodes(&line)));
    }

    #[test]
    fn remote_nodes_are_not() {
        assert!(!all_on_this_machine(&parse_nodes(CLUSTER)));
        let mixed = format!("{LOCAL}NodeName=gpu01 NodeAddr=192.0.2.11");
        assert!(
            !all_on_this_machine(&parse_nodes(&mixed)),
            "one remote node is enough"
        );
        assert!(!all_on_this_machine(&[]), "no node listed: refuse");
    }
}
