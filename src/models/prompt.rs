//! Tokenizer and chat template: from a question and an image to input ids.
