//! The seeded shapes-world generator (design §7).
