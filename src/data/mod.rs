//! VQA data: readers (our JSONL, VQAv2, VizWiz), the shapes-world generator, answer normalisation.

pub mod normalize;
pub mod shapes;
pub mod vqa;
