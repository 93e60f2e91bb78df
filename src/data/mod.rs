//! VQA data: readers (our JSONL, VQAv2, VizWiz in `vqa`; TextVQA, GQA, A-OKVQA in `benchmarks`;
//! Hugging Face datasets' Parquet files, as lmms-eval has its benchmarks, in `parquet`), the
//! shapes-world generator, answer normalisation, and the record of the questions particles were
//! trained on.

pub mod benchmarks;
pub mod normalize;
pub mod parquet;
pub mod seen;
pub mod shapes;
pub mod vqa;

pub use shapes::{generate, ShapesOptions, ShapesSummary};
pub use vqa::{
    read_dataset, read_dataset_up_to, read_jsonl, read_vizwiz, read_vqav2, write_jsonl, BadRecord,
    DataFormat, Dataset, ReadOptions, VqaExample,
};
