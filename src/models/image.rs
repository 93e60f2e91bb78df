//! Image preprocessing driven by `preprocessor_config.json`.
