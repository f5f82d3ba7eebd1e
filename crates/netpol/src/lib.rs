//! Skiff network policy: one engine that decides flows for both policy
//! kinds and explains why, compiled into the eBPF datapath's maps, and the
//! loader of that datapath.

pub mod bench;
pub mod cluster;
pub mod compile;
pub mod datapath;
pub mod engine;
pub mod maps;
pub mod model;
pub mod reference;
pub mod suite;
pub mod world;

pub use engine::{Decision, Engine, Outcome, Resolved, Verdict};
pub use model::{Direction, Flow, PolicyRef, PolicyRule};
pub use world::World;
