//! Pieces the examples share (and the integration tests use too).

pub mod postgres;
pub mod video;
