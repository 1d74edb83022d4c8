//! Longest-prefix-match trie over IPv4 and IPv6 prefixes with a 4-bit stride.
//!
//! Each node has 16 child links and 16 value slots. A prefix of length L = 4q + r
//! (1 ≤ r ≤ 4) lives at depth q and is expanded into the 2^(4−r) slots its top r bits cover
//! (controlled prefix expansion); a longer prefix wins a slot. Lookups read at most 8 (IPv4)
//! or 32 (IPv6) nodes, never allocate, and IPv4-mapped IPv6 addresses match IPv4 prefixes.
//! The trie is built once per configuration snapshot; there is no removal.

use ipnet::IpNet;
use std::net::IpAddr;

const STRIDE: u32 = 4;
const FANOUT: usize = 16;
const NONE: u32 = 0;

/// One nibble's worth of a node. Child and slot sit side by side so a lookup touches one
/// 8-byte pair (one cache line) per level.
#[derive(Debug, Clone, Copy, Default)]
struct Link {
    /// Index of the child node (0 = none; the root is never a child).
    child: u32,
    /// 1 + index into `entries` (0 = none).
    slot: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Node {
    links: [Link; FANOUT],
}

/// Bits resolved by the optional wide root.
const WIDE_BITS: u32 = 16;

#[derive(Debug, Clone)]
struct Table {
    nodes: Vec<Node>,
    bits: u32,
    default: Option<u32>,
    /// Direct-indexed first 16 bits (512 KiB), for large tries: saves four dependent
    /// cache misses per lookup. Small tries (most tenants) skip it to stay small.
    wide_root: Option<Box<[Link]>>,
}

impl Table {
    fn new(bits: u32, wide: bool) -> Self {
        Self {
            nodes: vec![Node::default()],
            bits,
            default: None,
            wide_root: wide.then(|| vec![Link::default(); 1 << WIDE_BITS].into_boxed_slice()),
        }
    }

    fn new_node(&mut self) -> u32 {
        self.nodes.push(Node::default());
        (self.nodes.len() - 1) as u32
    }
}

/// Tries expected to hold at least this many prefixes get a wide root.
pub const WIDE_ROOT_THRESHOLD: usize = 4096;

/// Maps prefixes to values; `lookup` returns the value of the longest matching prefix.
#[derive(Debug, Clone)]
pub struct PrefixTrie<V> {
    v4: Table,
    v6: Table,
    /// (prefix length, value)
    entries: Vec<(u8, V)>,
}

impl<V: Copy> Default for PrefixTrie<V> {
    fn default() -> Self {
        Self::new()
    }
}

/// Address as a left-aligned 128-bit key plus the table it belongs to.
fn key_of(addr: IpAddr) -> (bool, u128) {
    match addr {
        IpAddr::V4(v4) => (true, u128::from(u32::from(v4)) << 96),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (true, u128::from(u32::from(v4)) << 96),
            None => (false, u128::from(v6)),
        },
    }
}

fn nibble(key: u128, depth: u32) -> usize {
    ((key >> (128 - STRIDE * (depth + 1))) & 0xF) as usize
}

impl<V: Copy> PrefixTrie<V> {
    pub fn new() -> Self {
        Self::with_expected_len(0)
    }

    /// A trie sized for about `len` prefixes (large ones get a 16-bit wide root).
    pub fn with_expected_len(len: usize) -> Self {
        let wide = len >= WIDE_ROOT_THRESHOLD;
        Self {
            v4: Table::new(32, wide),
            v6: Table::new(128, wide),
            entries: Vec::with_capacity(len),
        }
    }

    /// Number of prefixes inserted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Nodes allocated (for memory accounting).
    pub fn node_count(&self) -> usize {
        self.v4.nodes.len() + self.v6.nodes.len()
    }

    /// Inserts `net` (host bits are ignored). Re-inserting a prefix replaces its value.
    pub fn insert(&mut self, net: IpNet, value: V) {
        let net = net.trunc();
        let (table, key, len) = match net {
            IpNet::V4(v4) => (
                &mut self.v4,
                u128::from(u32::from(v4.network())) << 96,
                u32::from(v4.prefix_len()),
            ),
            // ::ffff:a.b.c.d/L with L ≥ 96 is the IPv4 prefix a.b.c.d/(L − 96).
            IpNet::V6(v6) => match v6.network().to_ipv4_mapped() {
                Some(mapped) if v6.prefix_len() >= 96 => (
                    &mut self.v4,
                    u128::from(u32::from(mapped)) << 96,
                    u32::from(v6.prefix_len()) - 96,
                ),
                _ => (
                    &mut self.v6,
                    u128::from(v6.network()),
                    u32::from(v6.prefix_len()),
                ),
            },
        };
        self.entries.push((len as u8, value));
        let entry = self.entries.len() as u32; // 1-based
        let entries = &self.entries;
        if len == 0 {
            table.default = Some(entry);
            return;
        }
        let is_longer_or_equal = |current: u32| {
            current == NONE
                || entries
                    .get(current as usize - 1)
                    .is_none_or(|(existing_len, _)| u32::from(*existing_len) <= len)
        };
        let (mut node, start_depth) = match table.wide_root.as_mut() {
            Some(wide) if len <= WIDE_BITS => {
                let free_bits = WIDE_BITS - len;
                let base = ((key >> (128 - WIDE_BITS)) as usize) & !((1usize << free_bits) - 1);
                for link in &mut wide[base..base + (1usize << free_bits)] {
                    if is_longer_or_equal(link.slot) {
                        link.slot = entry;
                    }
                }
                return;
            }
            Some(wide) => {
                let index = (key >> (128 - WIDE_BITS)) as usize;
                let child = wide[index].child;
                let child = if child == NONE {
                    table.nodes.push(Node::default());
                    let created = (table.nodes.len() - 1) as u32;
                    if let Some(wide) = table.wide_root.as_mut() {
                        wide[index].child = created;
                    }
                    created
                } else {
                    child
                };
                (child as usize, WIDE_BITS / STRIDE)
            }
            None => (0usize, 0),
        };
        let depth = (len - 1) / STRIDE;
        let covered_bits = len - depth * STRIDE; // 1..=4
        for d in start_depth..depth {
            let n = nibble(key, d);
            let child = table.nodes[node].links[n].child;
            node = if child == NONE {
                let created = table.new_node();
                table.nodes[node].links[n].child = created;
                created as usize
            } else {
                child as usize
            };
        }
        let free_bits = STRIDE - covered_bits;
        let base = nibble(key, depth) & !((1usize << free_bits) - 1);
        for slot in base..base + (1usize << free_bits) {
            if is_longer_or_equal(table.nodes[node].links[slot].slot) {
                table.nodes[node].links[slot].slot = entry;
            }
        }
    }

    /// Value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<V> {
        let (is_v4, key) = key_of(addr);
        let table = if is_v4 { &self.v4 } else { &self.v6 };
        let mut best = table.default;
        let (mut node, start_depth) = match &table.wide_root {
            Some(wide) => {
                let link = wide.get((key >> (128 - WIDE_BITS)) as usize)?;
                if link.slot != NONE {
                    best = Some(link.slot);
                }
                if link.child == NONE {
                    return best
                        .and_then(|entry| self.entries.get(entry as usize - 1))
                        .map(|(_, v)| *v);
                }
                (link.child as usize, WIDE_BITS / STRIDE)
            }
            None => (0usize, 0),
        };
        for depth in start_depth..table.bits / STRIDE {
            let n = nibble(key, depth);
            let link = table.nodes.get(node)?.links[n];
            if link.slot != NONE {
                best = Some(link.slot);
            }
            match link.child {
                NONE => break,
                child => node = child as usize,
            }
        }
        best.and_then(|entry| self.entries.get(entry as usize - 1))
            .map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_whatever_the_insertion_order() {
        let mut trie = PrefixTrie::new();
        trie.insert(net("10.1.2.0/24"), 3);
        trie.insert(net("10.0.0.0/8"), 1);
        trie.insert(net("10.1.0.0/17"), 2);
        assert_eq!(trie.lookup(ip("10.1.2.3")), Some(3));
        assert_eq!(trie.lookup(ip("10.1.3.3")), Some(2));
        assert_eq!(trie.lookup(ip("10.1.128.1")), Some(1));
        assert_eq!(trie.lookup(ip("11.0.0.1")), None);
    }

    #[test]
    fn ipv4_mapped_ipv6_sources_match_ipv4_prefixes() {
        let mut trie = PrefixTrie::new();
        trie.insert(net("192.0.2.0/24"), true);
        trie.insert(net("2001:db8::/32"), true);
        assert_eq!(trie.lookup(ip("::ffff:192.0.2.9")), Some(true));
        assert_eq!(trie.lookup(ip("2001:db8:1::5")), Some(true));
        assert_eq!(trie.lookup(ip("2001:db9::5")), None);
    }

    #[test]
    fn default_route_and_host_routes_coexist() {
        let mut trie = PrefixTrie::new();
        trie.insert(net("0.0.0.0/0"), 0);
        trie.insert(net("192.0.2.7/32"), 7);
        trie.insert(net("::/0"), 60);
        assert_eq!(trie.lookup(ip("192.0.2.7")), Some(7));
        assert_eq!(trie.lookup(ip("192.0.2.8")), Some(0));
        assert_eq!(trie.lookup(ip("::1")), Some(60));
    }
}
