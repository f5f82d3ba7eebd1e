//! Skiff's resource kinds, read from YAML/JSON with every error located.

pub mod cluster;
pub mod decode;
pub mod meta;
pub mod net;
pub mod policy;
pub mod policytest;
pub mod prometheus;
pub mod quantity;
pub mod resource;
pub mod selector;
pub mod service;
pub mod yaml;

pub use decode::Diagnostic;
pub use resource::{
    KINDS, KindInfo, LoadReport, Loaded, Object, Resource, load_paths, load_str, load_str_in,
};
