//! Model sources: a hub id (with revision), the local hub cache, or a directory.
