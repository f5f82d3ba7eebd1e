//! Skiff's scheduler: places instances on nodes by resources, node
//! selectors, taints, spread and anti-affinity, scores the candidates, and
//! explains what it cannot place. Pure (no I/O, no clock) and deterministic
//! for a given seed.

mod domains;
mod index;
mod model;
mod scheduler;

pub use model::*;
pub use scheduler::{Config, Move, Preemption, Sampling, Scheduler, SchedulerError, Unschedulable};
