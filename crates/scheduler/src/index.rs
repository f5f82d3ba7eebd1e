//! An index of free resources: a segment tree over nodes keeping, per
//! subtree, the largest free CPU and the largest free memory. Looking for
//! nodes where a request fits skips every subtree where either maximum is
//! too small, so full nodes cost nothing and "fits nowhere" is known at the
//! root.

use crate::model::{CPU, MEMORY, Res};

#[derive(Debug, Clone)]
pub(crate) struct FreeIndex {
    /// Leaves start at `size`; node `i` has children `2i` and `2i+1`.
    max_cpu: Vec<u64>,
    max_mem: Vec<u64>,
    size: usize,
    len: usize,
}

impl FreeIndex {
    pub fn new(free: &[Res]) -> Self {
        let size = free.len().next_power_of_two().max(1);
        let mut idx = FreeIndex {
            max_cpu: vec![0; 2 * size],
            max_mem: vec![0; 2 * size],
            size,
            len: free.len(),
        };
        for (i, f) in free.iter().enumerate() {
            idx.max_cpu[size + i] = f.0[CPU];
            idx.max_mem[size + i] = f.0[MEMORY];
        }
        for i in (1..size).rev() {
            idx.pull(i);
        }
        idx
    }

    fn pull(&mut self, i: usize) {
        self.max_cpu[i] = self.max_cpu[2 * i].max(self.max_cpu[2 * i + 1]);
        self.max_mem[i] = self.max_mem[2 * i].max(self.max_mem[2 * i + 1]);
    }

    pub fn set(&mut self, node: usize, free: &Res) {
        let mut i = self.size + node;
        self.max_cpu[i] = free.0[CPU];
        self.max_mem[i] = free.0[MEMORY];
        while i > 1 {
            i /= 2;
            self.pull(i);
        }
    }

    fn may_fit(&self, i: usize, need: &Res) -> bool {
        self.max_cpu[i] >= need.0[CPU] && self.max_mem[i] >= need.0[MEMORY]
    }

    /// Calls `visit` for each node in `from..to` (in order) whose free CPU
    /// and memory cover `need`, until `visit` returns false. Returns false
    /// if stopped early.
    pub fn each_fitting(
        &self,
        from: usize,
        to: usize,
        need: &Res,
        visit: &mut impl FnMut(usize) -> bool,
    ) -> bool {
        self.walk(1, 0, self.size, from, to.min(self.len), need, visit)
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "a recursive walk carries its window"
    )]
    fn walk(
        &self,
        i: usize,
        lo: usize,
        hi: usize,
        from: usize,
        to: usize,
        need: &Res,
        visit: &mut impl FnMut(usize) -> bool,
    ) -> bool {
        if hi <= from || to <= lo || !self.may_fit(i, need) {
            return true;
        }
        if hi - lo == 1 {
            return visit(lo);
        }
        let mid = (lo + hi) / 2;
        self.walk(2 * i, lo, mid, from, to, need, visit)
            && self.walk(2 * i + 1, mid, hi, from, to, need, visit)
    }

    /// Whether any node has both the CPU and the memory free (maybe not the same node).
    pub fn anywhere(&self, need: &Res) -> bool {
        self.len > 0 && self.may_fit(1, need)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exactly_the_fitting_nodes_in_order() {
        let free: Vec<Res> = [(1, 8), (4, 1), (4, 4), (0, 0), (8, 8)]
            .iter()
            .map(|&(c, m)| Res::new(c, m))
            .collect();
        let mut idx = FreeIndex::new(&free);
        let need = Res::new(4, 4);
        let mut seen = Vec::new();
        idx.each_fitting(0, 5, &need, &mut |n| {
            seen.push(n);
            true
        });
        assert_eq!(seen, [2, 4]);
        seen.clear();
        idx.each_fitting(3, 5, &need, &mut |n| {
            seen.push(n);
            true
        });
        assert_eq!(seen, [4]);
        idx.set(4, &Res::new(0, 0));
        idx.set(2, &Res::new(3, 9));
        assert!(!idx.anywhere(&Res::new(9, 1)));
        seen.clear();
        idx.each_fitting(0, 5, &need, &mut |n| {
            seen.push(n);
            true
        });
        assert!(seen.is_empty());
    }
}
