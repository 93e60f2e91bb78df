//! The official VQA answer normalisation.
