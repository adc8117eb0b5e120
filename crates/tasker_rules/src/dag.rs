//! The dependency graph of one task's steps (or of a template's steps), on petgraph.
//!
//! Edges run from parent (provider) to child (dependent), as `tasker_workflow_step_edges`
//! stores them. Parallel (duplicate) edges are kept: Rails counts them. The graph is a
//! petgraph `DiGraph` whose node indexes are the steps' positions; the analyses use
//! petgraph's non-recursive algorithms (a backend's stack is small and a template may have
//! 10,000 steps): `toposort` for the order and for finding a cycle, breadth-first walks for
//! reachability and depths. Every analysis is O(steps + edges). Readiness never walks this
//! graph: it is a linear pass over maintained counts (`readiness`).

use super::interrupt;
use petgraph::algo::{toposort, Cycle};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{EdgeRef, NodeFiltered};
use petgraph::Direction::{Incoming, Outgoing};
use std::collections::{HashMap, VecDeque};

/// A directed graph over step ids.
#[derive(Debug, Clone, Default)]
pub struct Dag {
    graph: DiGraph<i64, ()>,
    ids: Vec<i64>,
    index: HashMap<i64, usize>,
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
                e.insert(dag.graph.add_node(id).index());
                dag.ids.push(id);
            }
        }
        for (from, to) in edges {
            interrupt::check();
            if let (Some(&f), Some(&t)) = (dag.index.get(&from), dag.index.get(&to)) {
                dag.graph.add_edge(NodeIndex::new(f), NodeIndex::new(t), ());
            }
        }
        dag
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    /// Whether the graph has no steps.
    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// Step ids in the order they were given.
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// Position of a step id, if present.
    pub fn position(&self, id: i64) -> Option<usize> {
        self.index.get(&id).copied()
    }

    /// Parent step ids of the step at `pos` (one entry per edge, in the order the edges were
    /// given).
    pub fn parent_ids(&self, pos: usize) -> impl Iterator<Item = i64> + '_ {
        self.ends(pos, Incoming).into_iter().map(move |p| self.graph[NodeIndex::new(p)])
    }

    /// Child step ids of the step at `pos` (one entry per edge, in the order the edges were
    /// given).
    pub fn child_ids(&self, pos: usize) -> impl Iterator<Item = i64> + '_ {
        self.ends(pos, Outgoing).into_iter().map(move |c| self.graph[NodeIndex::new(c)])
    }

    /// Positions at the other end of the edges of `pos` in direction `dir`, in edge order
    /// (petgraph lists a node's edges newest first).
    fn ends(&self, pos: usize, dir: petgraph::Direction) -> Vec<usize> {
        let mut v: Vec<(usize, usize)> = self
            .graph
            .edges_directed(NodeIndex::new(pos), dir)
            .map(|e| {
                let other = if dir == Outgoing { e.target() } else { e.source() };
                (e.id().index(), other.index())
            })
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, other)| other).collect()
    }

    /// Positions in an order where parents come first; `Err(cycle)` names the step ids of one
    /// cycle, first id repeated at the end.
    pub fn topological_order(&self) -> Result<Vec<usize>, Vec<i64>> {
        toposort(&self.graph, None)
            .map(|order| order.into_iter().map(NodeIndex::index).collect())
            .map_err(|c| self.cycle_through(c))
    }

    /// One cycle through the node petgraph found on a cycle: the shortest way back to it (a
    /// breadth-first walk, which stays inside its strongly connected component).
    fn cycle_through(&self, found: Cycle<NodeIndex>) -> Vec<i64> {
        let start = found.node_id();
        let mut came_from: HashMap<NodeIndex, NodeIndex> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        while let Some(v) = queue.pop_front() {
            interrupt::check();
            for c in self.graph.neighbors_directed(v, Outgoing) {
                if c == start {
                    // start -> ... -> v -> start
                    let mut path = vec![v];
                    let mut cur = v;
                    while cur != start {
                        cur = came_from[&cur];
                        path.push(cur);
                    }
                    path.reverse();
                    let mut cycle: Vec<i64> = path.iter().map(|&n| self.graph[n]).collect();
                    cycle.push(self.graph[start]);
                    return cycle;
                }
                if let std::collections::hash_map::Entry::Vacant(e) = came_from.entry(c) {
                    e.insert(v);
                    queue.push_back(c);
                }
            }
        }
        // (toposort names a node on a cycle, so the walk always returns to it)
        vec![self.graph[start], self.graph[start]]
    }

    /// Longest-path level of every step (roots are 0; a child is one more than its deepest
    /// parent). `Err(cycle)` when the graph is not acyclic.
    pub fn levels(&self) -> Result<Vec<u32>, Vec<i64>> {
        let order = self.topological_order()?;
        let mut level = vec![0u32; self.len()];
        for i in order {
            interrupt::check();
            for c in self.graph.neighbors_directed(NodeIndex::new(i), Outgoing) {
                level[c.index()] = level[c.index()].max(level[i] + 1);
            }
        }
        Ok(level)
    }

    /// Longest-path levels measured only along paths that start at `roots` (positions):
    /// `None` for steps no root reaches. `Err(cycle)` when a cycle is reachable from a root
    /// (where a path-enumerating recursive CTE would never finish).
    pub fn levels_from(&self, roots: &[usize]) -> Result<Vec<Option<u32>>, Vec<i64>> {
        let reached = self.reached_from(roots);
        let sub = NodeFiltered::from_fn(&self.graph, |n: NodeIndex| reached[n.index()].is_some());
        let order = toposort(&sub, None).map_err(|c| self.cycle_through(c))?;
        let mut level: Vec<Option<u32>> = vec![None; self.len()];
        for &r in roots {
            level[r] = Some(0);
        }
        for v in order {
            interrupt::check();
            let next = level[v.index()].unwrap_or(0) + 1;
            for c in self.graph.neighbors_directed(v, Outgoing) {
                level[c.index()] = Some(level[c.index()].map_or(next, |l| l.max(next)));
            }
        }
        Ok(level)
    }

    /// Shortest distance from any root (a step without parents) to each step, by breadth-first
    /// search; `None` for steps no root reaches (possible only with cycles).
    pub fn min_depths(&self) -> Vec<Option<u32>> {
        let roots: Vec<usize> = self
            .graph
            .node_indices()
            .filter(|&n| self.graph.neighbors_directed(n, Incoming).next().is_none())
            .map(NodeIndex::index)
            .collect();
        self.min_depths_from(&roots)
    }

    /// Shortest distance from any of `roots` (positions) to each step; `None` where no root
    /// reaches.
    pub fn min_depths_from(&self, roots: &[usize]) -> Vec<Option<u32>> {
        self.reached_from(roots)
    }

    /// Breadth-first from `roots` at once: each step's distance from the nearest, `None` where
    /// none reaches.
    fn reached_from(&self, roots: &[usize]) -> Vec<Option<u32>> {
        let mut depth = vec![None; self.len()];
        let mut queue = VecDeque::new();
        for &i in roots {
            if depth[i].is_none() {
                depth[i] = Some(0);
                queue.push_back(NodeIndex::new(i));
            }
        }
        while let Some(v) = queue.pop_front() {
            interrupt::check();
            let d = depth[v.index()].unwrap_or(0) + 1;
            for c in self.graph.neighbors_directed(v, Outgoing) {
                if depth[c.index()].is_none() {
                    depth[c.index()] = Some(d);
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
        let pos: HashMap<i64, usize> =
            order.iter().enumerate().map(|(k, &i)| (dag.ids()[i], k)).collect();
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
