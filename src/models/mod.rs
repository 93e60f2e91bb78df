//! Model implementations in the Hugging Face layout, every linear layer particle-capable.

pub mod image;
pub mod prompt;
