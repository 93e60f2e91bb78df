//! VQA readers: our JSONL (design §10), VQAv2 questions + annotations, VizWiz.
