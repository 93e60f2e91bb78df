//! Answering with particles: generation, candidate scoring, aggregation, abstention.

pub mod aggregate;
pub mod generate;
pub mod score;
