//! Typed errors that callers may want to match on.
