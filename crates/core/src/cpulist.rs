//! CPU lists as the kernel prints them (`0-55,112-167`, `3`, empty): parsed into sorted,
//! merged ranges so that a device's `local_cpulist` can be matched against NUMA nodes.

/// Highest CPU number accepted; the kernel's NR_CPUS limit is 8192, so anything far beyond it
/// is a corrupt file rather than a big machine.
const MAX_CPU: u32 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid CPU list {input:?}: {reason}")]
pub struct InvalidCpuList {
    pub input: String,
    pub reason: &'static str,
}

/// A set of CPUs as inclusive ranges, sorted and non-overlapping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuList {
    ranges: Vec<(u32, u32)>,
}

impl CpuList {
    pub fn parse(input: &str) -> Result<Self, InvalidCpuList> {
        let fail = |reason| InvalidCpuList {
            input: input.to_string(),
            reason,
        };
        let text = input.trim();
        let mut ranges = Vec::new();
        if text.is_empty() {
            return Ok(Self { ranges });
        }
        for item in text.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(fail("empty item"));
            }
            let (lo, hi) = match item.split_once('-') {
                Some((lo, hi)) => (
                    parse_cpu(lo).ok_or_else(|| fail("bad number"))?,
                    parse_cpu(hi).ok_or_else(|| fail("bad number"))?,
                ),
                None => {
                    let cpu = parse_cpu(item).ok_or_else(|| fail("bad number"))?;
                    (cpu, cpu)
                }
            };
            if lo > hi {
                return Err(fail("range runs backwards"));
            }
            ranges.push((lo, hi));
        }
        Ok(Self::from_ranges(ranges))
    }

    /// The set holding exactly these CPUs (any order, duplicates allowed).
    pub fn from_cpus(cpus: impl IntoIterator<Item = u32>) -> Self {
        Self::from_ranges(cpus.into_iter().map(|c| (c, c)).collect())
    }

    /// Every CPU of either set.
    pub fn union(&self, other: &CpuList) -> Self {
        Self::from_ranges(self.ranges.iter().chain(&other.ranges).copied().collect())
    }

    fn from_ranges(mut ranges: Vec<(u32, u32)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Self { ranges: merged }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    pub fn contains(&self, cpu: u32) -> bool {
        self.ranges.iter().any(|&(lo, hi)| lo <= cpu && cpu <= hi)
    }

    /// Whether the two sets share at least one CPU (both are sorted, so one merge pass).
    pub fn intersects(&self, other: &CpuList) -> bool {
        let (mut i, mut j) = (0, 0);
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a_lo, a_hi) = self.ranges[i];
            let (b_lo, b_hi) = other.ranges[j];
            if a_lo <= b_hi && b_lo <= a_hi {
                return true;
            }
            if a_hi < b_hi {
                i += 1;
            } else {
                j += 1;
            }
        }
        false
    }
}

fn parse_cpu(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().filter(|&cpu| cpu <= MAX_CPU)
}

/// Prints the kernel's spelling: `0-55,112-167`, `3`, or nothing for an empty set.
impl std::fmt::Display for CpuList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> CpuList {
        CpuList::parse(s).unwrap()
    }

    #[test]
    fn parses_kernel_spellings() {
        assert_eq!(list("0-55,112-167").ranges(), &[(0, 55), (112, 167)]);
        assert_eq!(list("3").ranges(), &[(3, 3)]);
        assert_eq!(list("3\n").ranges(), &[(3, 3)]);
        assert_eq!(list(" 0-3 , 8 \n").ranges(), &[(0, 3), (8, 8)]);
        assert!(list("").is_empty());
        assert!(list("\n").is_empty());
    }

    #[test]
    fn merges_and_sorts() {
        assert_eq!(list("8-9,0-3,4,2-5").ranges(), &[(0, 5), (8, 9)]);
        assert_eq!(list("8-9,0-3,4,2-5,6-7").ranges(), &[(0, 9)]);
        assert_eq!(list("10,1").ranges(), &[(1, 1), (10, 10)]);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "0-",
            "-3",
            "a",
            "1,,2",
            "3-1",
            "0-55,",
            "1 2",
            "0x3",
            "1-2-3",
            "+1",
            "0-15:2",
            "99999999999",
        ] {
            let err = CpuList::parse(bad).unwrap_err();
            assert_eq!(err.input, bad);
        }
    }

    #[test]
    fn intersection() {
        let node0 = list("0-55,112-167");
        let node1 = list("56-111,168-223");
        assert!(list("120").intersects(&node0));
        assert!(!list("120").intersects(&node1));
        assert!(list("50-60").intersects(&node0));
        assert!(list("50-60").intersects(&node1));
        assert!(!CpuList::default().intersects(&node0));
        assert!(list("3").contains(3) && !list("3").contains(4));
    }

    #[test]
    fn prints_the_kernel_spelling_and_unions() {
        let a = CpuList::parse("0-55,112-167").unwrap();
        let b = CpuList::parse("56-111,168-223").unwrap();
        assert_eq!(a.to_string(), "0-55,112-167");
        assert_eq!(a.union(&b).to_string(), "0-223");
        assert_eq!(CpuList::from_cpus([3, 1, 2, 7]).to_string(), "1-3,7");
        assert_eq!(CpuList::default().to_string(), "");
    }
}
