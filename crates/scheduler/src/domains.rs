//! Per-service instance counts over the domains of a topology key, with
//! the minimum over eligible domains kept up to date in O(1) per change.

/// Counts of one service's instances per domain of one topology key.
#[derive(Debug, Clone)]
pub(crate) struct DomainCounts {
    pub counts: Vec<u32>,
    /// Domains the service may be placed in (its nodes pass selector and taints).
    pub eligible: Vec<bool>,
    /// How many eligible domains have each count.
    histogram: Vec<u32>,
    /// The smallest count among eligible domains (0 when there are none).
    pub min: u32,
}

impl DomainCounts {
    pub fn new(eligible: Vec<bool>) -> Self {
        let n = eligible.iter().filter(|e| **e).count() as u32;
        DomainCounts {
            counts: vec![0; eligible.len()],
            eligible,
            histogram: vec![n],
            min: 0,
        }
    }

    pub fn add(&mut self, domain: usize) {
        let c = self.counts[domain] as usize;
        self.counts[domain] += 1;
        if self.eligible[domain] {
            self.histogram[c] -= 1;
            if self.histogram.len() <= c + 1 {
                self.histogram.push(0);
            }
            self.histogram[c + 1] += 1;
            while (self.min as usize) < self.histogram.len() - 1
                && self.histogram[self.min as usize] == 0
            {
                self.min += 1;
            }
        }
    }

    pub fn remove(&mut self, domain: usize) {
        let c = self.counts[domain] as usize;
        if c == 0 {
            return;
        }
        self.counts[domain] -= 1;
        if self.eligible[domain] {
            self.histogram[c] -= 1;
            self.histogram[c - 1] += 1;
            self.min = self.min.min(c as u32 - 1);
        }
    }

    /// The largest count minus the smallest, over eligible domains.
    pub fn skew(&self) -> u32 {
        let max = self
            .counts
            .iter()
            .zip(&self.eligible)
            .filter(|(_, e)| **e)
            .map(|(c, _)| *c)
            .max()
            .unwrap_or(0);
        max - self.min
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_follows_changes() {
        let mut d = DomainCounts::new(vec![true, true, false, true]);
        for dom in [0, 1, 3, 0, 2, 2, 2] {
            d.add(dom);
        }
        assert_eq!(d.counts, [2, 1, 3, 1]);
        assert_eq!(d.min, 1);
        assert_eq!(d.skew(), 1);
        d.add(1);
        d.add(3);
        assert_eq!(d.min, 2);
        d.remove(1);
        assert_eq!(d.min, 1);
    }
}
