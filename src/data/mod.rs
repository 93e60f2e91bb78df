//! VQA data: readers (our JSONL, VQAv2, VizWiz), the shapes-world generator, answer normalisation,
//! and the record of the questions particles were trained on.

pub mod normalize;
pub mod seen;
pub mod shapes;
pub mod vqa;

pub use shapes::{generate, ShapesOptions, ShapesSummary};
pub use vqa::{
    read_dataset, read_jsonl, read_vizwiz, read_vqav2, write_jsonl, BadRecord, DataFormat, Dataset,
    ReadOptions, VqaExample,
};
