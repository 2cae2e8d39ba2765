//! NUMA nodes from `devices/system/node/node<N>/{cpulist,distance}`, and the rule that gives
//! a device whose `numa_node` says -1 a node anyway: the one node its `local_cpulist` touches.

use super::Problems;
use super::cpulist::CpuList;
use super::reader::RootedReader;
use crate::topology::NumaNode;

const NODE_DIR: &str = "devices/system/node";

/// The machine's NUMA nodes, with their CPU sets parsed for matching device cpulists.
#[derive(Debug, Default)]
pub struct NumaTopology {
    pub nodes: Vec<NumaNode>,
    /// Parsed cpulist per node id; nodes whose cpulist could not be parsed are absent.
    cpus: Vec<(u32, CpuList)>,
}

impl NumaTopology {
    /// Reads every `node<N>` directory. A machine (or kernel) without NUMA has no such
    /// directory at all: that is an empty topology, not a problem.
    pub fn read(sys: &RootedReader, problems: &mut Problems) -> Self {
        let mut topology = Self::default();
        let dir = match sys.dir(NODE_DIR) {
            Ok(d) => d,
            Err(e) if e.is_missing() => return topology,
            Err(e) => {
                problems.add(None, e);
                return topology;
            }
        };
        let entries = match dir.entries() {
            Ok(e) => e,
            Err(e) => {
                problems.add(None, e);
                return topology;
            }
        };
        for entry in entries {
            let Some(id) = node_id(&entry.name) else {
                continue;
            };
            let node_dir = match dir.subdir(&entry.name) {
                Ok(d) => d,
                Err(e) => {
                    problems.add(None, e);
                    continue;
                }
            };
            let cpulist = match node_dir.attr("cpulist") {
                Ok(text) => {
                    match CpuList::parse(&text) {
                        Ok(cpus) => topology.cpus.push((id, cpus)),
                        Err(e) => {
                            problems.message(None, node_dir.file_path("cpulist"), e.to_string())
                        }
                    }
                    text
                }
                Err(e) => {
                    problems.add(None, e);
                    String::new()
                }
            };
            let distances = node_dir
                .parsed(
                    "distance",
                    "node distances such as \"10 21\"",
                    parse_distances,
                )
                .unwrap_or_else(|e| {
                    problems.add(None, e);
                    Vec::new()
                });
            topology.nodes.push(NumaNode {
                id,
                cpulist,
                distances,
            });
        }
        topology.nodes.sort_by_key(|n| n.id);
        topology
    }

    /// The single node whose CPUs intersect `local`; `None` when none or several do.
    pub fn node_for_cpus(&self, local: &CpuList) -> Option<u32> {
        let mut found = None;
        for (id, cpus) in &self.cpus {
            if cpus.intersects(local) {
                if found.is_some() {
                    return None;
                }
                found = Some(*id);
            }
        }
        found
    }
}

/// `node12` -> 12; other entries of the directory (`online`, `possible`, ...) are not nodes.
fn node_id(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("node")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn parse_distances(text: &str) -> Option<Vec<u32>> {
    text.split_whitespace()
        .map(|d| d.parse::<u32>().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert_eq!(node_id("node0"), Some(0));
        assert_eq!(node_id("node17"), Some(17));
        assert_eq!(node_id("node"), None);
        assert_eq!(node_id("online"), None);
        assert_eq!(node_id("node1a"), None);
    }

    #[test]
    fn distances() {
        assert_eq!(parse_distances("10 21\n"), Some(vec![10, 21]));
        assert_eq!(parse_distances("10\t21 21 32"), Some(vec![10, 21, 21, 32]));
        assert_eq!(parse_distances("10 x"), None);
        assert_eq!(parse_distances("-1"), None);
    }

    #[test]
    fn single_intersecting_node_only() {
        let topology = NumaTopology {
            nodes: Vec::new(),
            cpus: vec![
                (0, CpuList::parse("0-55,112-167").unwrap()),
                (1, CpuList::parse("56-111,168-223").unwrap()),
            ],
        };
        assert_eq!(
            topology.node_for_cpus(&CpuList::parse("56-111").unwrap()),
            Some(1)
        );
        assert_eq!(
            topology.node_for_cpus(&CpuList::parse("0-223").unwrap()),
            None
        );
        assert_eq!(
            topology.node_for_cpus(&CpuList::parse("300").unwrap()),
            None
        );
        assert_eq!(topology.node_for_cpus(&CpuList::default()), None);
    }
}
