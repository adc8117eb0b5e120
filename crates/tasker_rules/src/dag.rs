//! The dependency graph of one task's steps, with linear-time analyses.
//!
//! Edges run from parent (provider) to child (dependent), as `tasker_workflow_step_edges`
//! stores them. Parallel (duplicate) edges are kept: Rails counts them.

use super::interrupt;
use std::collections::{HashMap, VecDeque};

/// A directed graph over step ids. Every analysis is O(steps + edges).
#[derive(Debug, Clone, Default)]
pub struct Dag {
    ids: Vec<i64>,
    index: HashMap<i64, usize>,
    parents: Vec<Vec<usize>>,
    children: Vec<Vec<usize>>,
}

impl Dag {
    /// Builds the graph. Steps keep the order given; edges naming an unknown step are ignored.
    pub fn new(
        steps: impl IntoIterator<Item = i64>,
        edges: impl IntoIterator<Item = (i64, i64)>,
    ) -> Dag {
        let mut dag = Dag::default();
        for id in steps {
            interrupt::check();
            if let std::collections::hash_map::Entry::Vacant(e) = dag.index.entry(id) {
                e.insert(dag.ids.len());
                dag.ids.push(id);
                dag.parents.push(Vec::new());
                dag.children.push(Vec::new());
            }
        }
        for (from, to) in edges {
            interrupt::check();
            if let (Some(&f), Some(&t)) = (dag.index.get(&from), dag.index.get(&to)) {
                dag.children[f].push(t);
                dag.parents[t].push(f);
            }
        }
        dag
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the graph has no steps.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Step ids in the order they were given.
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// Position of a step id, if present.
    pub fn position(&self, id: i64) -> Option<usize> {
        self.index.get(&id).copied()
    }

    /// Parent step ids of the step at `pos` (one entry per edge).
    pub fn parent_ids(&self, pos: usize) -> impl Iterator<Item = i64> + '_ {
        self.parents[pos].iter().map(move |&p| self.ids[p])
    }

    /// Child step ids of the step at `pos` (one entry per edge).
    pub fn child_ids(&self, pos: usize) -> impl Iterator<Item = i64> + '_ {
        self.children[pos].iter().map(move |&c| self.ids[c])
    }

    /// Kahn's algorithm. `Ok(order)` lists positions parents-first; `Err(cycle)` names the step
    /// ids of one cycle, first id repeated at the end.
    pub fn topological_order(&self) -> Result<Vec<usize>, Vec<i64>> {
        let n = self.len();
        let mut indegree: Vec<usize> = self.parents.iter().map(Vec::len).collect();
        let mut queue: VecDeque<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = queue.pop_front() {
            interrupt::check();
            order.push(i);
            for &c in &self.children[i] {
                indegree[c] -= 1;
                if indegree[c] == 0 {
                    queue.push_back(c);
                }
            }
        }
        if order.len() == n {
            Ok(order)
        } else {
            Err(self.cycle_among(&indegree))
        }
    }

    /// Finds one cycle among the nodes Kahn's algorithm could not remove (indegree > 0).
    fn cycle_among(&self, indegree: &[usize]) -> Vec<i64> {
        // Every leftover node has a leftover parent: walk parents until a node repeats.
        let start = match (0..self.len()).find(|&i| indegree[i] > 0) {
            Some(s) => s,
            None => return Vec::new(),
        };
        let mut seen_at = vec![usize::MAX; self.len()];
        let mut path = Vec::new();
        let mut cur = start;
        while seen_at[cur] == usize::MAX {
            interrupt::check();
            seen_at[cur] = path.len();
            path.push(cur);
            cur = *self.parents[cur]
                .iter()
                .find(|&&p| indegree[p] > 0)
                .expect("a node left by Kahn's algorithm has a leftover parent");
        }
        // path[seen_at[cur]..] walks child -> parent; reverse it to read parent -> child.
        let mut cycle: Vec<i64> = path[seen_at[cur]..]
            .iter()
            .rev()
            .map(|&i| self.ids[i])
            .collect();
        cycle.push(cycle[0]);
        cycle
    }

    /// Longest-path level of every step (roots are 0; a child is one more than its deepest
    /// parent). `Err(cycle)` when the graph is not acyclic.
    pub fn levels(&self) -> Result<Vec<u32>, Vec<i64>> {
        let order = self.topological_order()?;
        let mut level = vec![0u32; self.len()];
        for i in order {
            interrupt::check();
            for &c in &self.children[i] {
                level[c] = level[c].max(level[i] + 1);
            }
        }
        Ok(level)
    }

    /// Longest-path levels measured only along paths that start at `roots` (positions):
    /// `None` for steps no root reaches. `Err(cycle)` when a cycle is reachable from a root
    /// (where a path-enumerating recursive CTE would never finish).
    pub fn levels_from(&self, roots: &[usize]) -> Result<Vec<Option<u32>>, Vec<i64>> {
        let n = self.len();
        let mut reachable = vec![false; n];
        let mut queue: VecDeque<usize> = VecDeque::new();
        for &r in roots {
            if !reachable[r] {
                reachable[r] = true;
                queue.push_back(r);
            }
        }
        while let Some(i) = queue.pop_front() {
            interrupt::check();
            for &c in &self.children[i] {
                if !reachable[c] {
                    reachable[c] = true;
                    queue.push_back(c);
                }
            }
        }
        // Kahn's algorithm on the reachable subgraph.
        let mut indegree = vec![0usize; n];
        for i in (0..n).filter(|&i| reachable[i]) {
            interrupt::check();
            for &c in &self.children[i] {
                indegree[c] += 1;
            }
        }
        let mut level: Vec<Option<u32>> = vec![None; n];
        let mut ready: VecDeque<usize> = (0..n)
            .filter(|&i| reachable[i] && indegree[i] == 0)
            .collect();
        for &i in &ready {
            level[i] = Some(0);
        }
        let mut done = 0;
        while let Some(i) = ready.pop_front() {
            interrupt::check();
            done += 1;
            let next = level[i].unwrap_or(0) + 1;
            for &c in &self.children[i] {
                level[c] = Some(level[c].map_or(next, |l| l.max(next)));
                indegree[c] -= 1;
                if indegree[c] == 0 {
                    ready.push_back(c);
                }
            }
        }
        if done < reachable.iter().filter(|&&r| r).count() {
            let leftover: Vec<usize> = (0..n)
                .map(|i| if reachable[i] { indegree[i] } else { 0 })
                .collect();
            return Err(self.cycle_among(&leftover));
        }
        Ok(level)
    }

    /// Shortest distance from any root (a step without parents) to each step, by breadth-first
    /// search; `None` for steps no root reaches (possible only with cycles).
    pub fn min_depths(&self) -> Vec<Option<u32>> {
        let roots: Vec<usize> = (0..self.len())
            .filter(|&i| self.parents[i].is_empty())
            .collect();
        self.min_depths_from(&roots)
    }

    /// Shortest distance from any of `roots` (positions) to each step; `None` where no root
    /// reaches.
    pub fn min_depths_from(&self, roots: &[usize]) -> Vec<Option<u32>> {
        let mut depth = vec![None; self.len()];
        let mut queue = VecDeque::new();
        for &i in roots {
            if depth[i].is_none() {
                depth[i] = Some(0);
                queue.push_back(i);
            }
        }
        while let Some(i) = queue.pop_front() {
            interrupt::check();
            let d = depth[i].unwrap_or(0) + 1;
            for &c in &self.children[i] {
                if depth[c].is_none() {
                    depth[c] = Some(d);
                    queue.push_back(c);
                }
            }
        }
        depth
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// a -> {b, c} -> d -> e  (fan-out, fan-in, tail)
    fn diamond() -> Dag {
        Dag::new([1, 2, 3, 4, 5], [(1, 2), (1, 3), (2, 4), (3, 4), (4, 5)])
    }

    #[test]
    fn orders_parents_first() {
        let dag = diamond();
        let order = dag.topological_order().unwrap();
        let pos: HashMap<i64, usize> = order
            .iter()
            .enumerate()
            .map(|(k, &i)| (dag.ids()[i], k))
            .collect();
        for (from, to) in [(1, 2), (1, 3), (2, 4), (3, 4), (4, 5)] {
            assert!(pos[&from] < pos[&to], "{from} must come before {to}");
        }
    }

    #[test]
    fn levels_are_longest_paths() {
        // 1 -> 2 -> 3 and 1 -> 3: the longest path to 3 has length 2.
        let dag = Dag::new([1, 2, 3], [(1, 2), (2, 3), (1, 3)]);
        assert_eq!(dag.levels().unwrap(), vec![0, 1, 2]);
        assert_eq!(diamond().levels().unwrap(), vec![0, 1, 1, 2, 3]);
    }

    #[test]
    fn min_depths_are_shortest_paths() {
        let dag = Dag::new([1, 2, 3], [(1, 2), (2, 3), (1, 3)]);
        assert_eq!(dag.min_depths(), vec![Some(0), Some(1), Some(1)]);
    }

    #[test]
    fn reports_a_cycle_with_its_steps() {
        let dag = Dag::new([1, 2, 3, 4], [(1, 2), (2, 3), (3, 2), (3, 4)]);
        let cycle = dag.topological_order().unwrap_err();
        assert_eq!(cycle.first(), cycle.last());
        let mut members: Vec<i64> = cycle[..cycle.len() - 1].to_vec();
        members.sort();
        assert_eq!(members, vec![2, 3]);
        assert!(dag.levels().is_err());
        // 2 and 3 are reached from the root 1 despite the cycle; 4 is reached through 3.
        assert_eq!(dag.min_depths(), vec![Some(0), Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn self_loop_is_a_cycle() {
        let dag = Dag::new([7], [(7, 7)]);
        assert_eq!(dag.topological_order().unwrap_err(), vec![7, 7]);
    }

    #[test]
    fn keeps_parallel_edges_and_ignores_foreign_ones() {
        let dag = Dag::new([1, 2], [(1, 2), (1, 2), (1, 99), (98, 2)]);
        assert_eq!(dag.parent_ids(1).collect::<Vec<_>>(), vec![1, 1]);
        assert_eq!(dag.child_ids(0).collect::<Vec<_>>(), vec![2, 2]);
        assert_eq!(dag.levels().unwrap(), vec![0, 1]);
    }

    #[test]
    fn levels_from_given_roots_skip_unreached_steps() {
        // 1 -> 2 -> 3, and 4 -> 3 where 4 is not a root (it has a parent elsewhere).
        let dag = Dag::new([1, 2, 3, 4], [(1, 2), (2, 3), (4, 3)]);
        let levels = dag.levels_from(&[0]).unwrap();
        assert_eq!(levels, vec![Some(0), Some(1), Some(2), None]);
        // A cycle reachable from a root is an error; an unreachable one is not.
        let dag = Dag::new([1, 2, 3, 4, 5], [(1, 2), (2, 3), (3, 2), (4, 5), (5, 4)]);
        assert!(dag.levels_from(&[0]).is_err());
        let dag = Dag::new([1, 4, 5], [(4, 5), (5, 4)]);
        assert_eq!(dag.levels_from(&[0]).unwrap(), vec![Some(0), None, None]);
    }

    #[test]
    fn empty_graph() {
        let dag = Dag::new([], []);
        assert!(dag.is_empty());
        assert_eq!(dag.topological_order().unwrap(), Vec::<usize>::new());
    }
}
