//! The official VQA answer normalisation.
pub fn normalize_answer(s: &str) -> String {
    s.trim().to_lowercase()
} // TEMPORARY until the metrics branch lands
