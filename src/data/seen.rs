//! The questions a particle set was trained on, so that calibrating or benchmarking on them is
//! noticed: a threshold chosen on training questions trusts the particles more than new
//! questions warrant, and accuracy measured on them says how well they were memorised.
//!
//! `train` writes `training_questions.bin` into the particle directory: one 64-bit key per
//! distinct training question (its image file, as an absolute path, and its text), sorted, as
//! little-endian u64. `calibrate` and `bench` count how many of their questions have a key there.
//! A data set moved to another folder no longer matches (the keys hold the image path): the check
//! catches the common mistake of passing the training file again, not every copy of it.

use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::VqaExample;

/// The file in a particle directory.
pub const FILE: &str = "training_questions.bin";

/// The key of a question: its image file (absolute, `..` and links resolved where the file
/// exists) and its text.
pub fn key(example: &VqaExample) -> u64 {
    let image = std::fs::canonicalize(&example.image)
        .or_else(|_| std::path::absolute(&example.image))
        .unwrap_or_else(|_| example.image.clone());
    let mut hasher = Sha256::new();
    hasher.update(image.to_string_lossy().as_bytes());
    hasher.update([0]);
    hasher.update(example.question.trim().as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// The keys of `examples`, sorted and without repeats (what [`count`] searches).
pub fn keys(examples: &[VqaExample]) -> Vec<u64> {
    let mut keys: Vec<u64> = examples.iter().map(key).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The file's contents for `examples`: their [`keys`] as little-endian u64.
pub fn encode(examples: &[VqaExample]) -> Vec<u8> {
    keys(examples)
        .iter()
        .flat_map(|k| k.to_le_bytes())
        .collect()
}

/// Writes `encoded` ([`encode`]) into `dir`, atomically, unless it is there already. Something
/// other than a file in its place (a folder, a pipe) is refused rather than written through.
pub fn write(dir: &Path, encoded: &[u8]) -> Result<()> {
    let path = dir.join(FILE);
    if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
        bail!(
            "{} is not a regular file: delete it (train writes the keys of its training \
             questions there)",
            path.display()
        );
    }
    if std::fs::read(&path).is_ok_and(|old| old == encoded) {
        return Ok(());
    }
    crate::io::write_bytes_atomically(&path, encoded)
}

/// The keys stored in `dir`; `None` when it has none (particles imported, or trained before
/// this file existed).
pub fn read(dir: &Path) -> Result<Option<Vec<u64>>> {
    let path = dir.join(FILE);
    // Imported particles (import-peft) come with no list: one beside them is a leftover of the
    // set they replaced (an import stopped before it removed that set's files).
    let imported = crate::bella::particles::ParticleSet::read_config(dir)
        .is_ok_and(|c| c.method == crate::bella::peft::IMPORTED_METHOD);
    if imported {
        return Ok(None);
    }
    let delete = "delete it (it only serves to notice training questions among calibration or \
                  test questions)";
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // A pipe would block the read; a folder or a link loop cannot be read.
        Ok(m) if m.is_file() => {}
        _ => bail!("{} is not a regular file: {delete}", path.display()),
    }
    let bytes = std::fs::read(&path)
        .with_context(|| format!("cannot read {}: {delete}", path.display()))?;
    if bytes.len() % 8 != 0 {
        bail!(
            "{} is damaged ({} bytes, not a whole number of 8-byte keys): {delete}",
            path.display(),
            bytes.len()
        );
    }
    let mut keys: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    // Written sorted; sorted again so that a file from elsewhere still matches.
    keys.sort_unstable();
    Ok(Some(keys))
}

/// How many of `examples` are among the sorted `keys`.
pub fn count(keys: &[u64], examples: &[VqaExample]) -> usize {
    examples
        .iter()
        .filter(|e| keys.binary_search(&key(e)).is_ok())
        .count()
}

/// The warning for `seen` of `total` questions of `what` being training questions.
pub fn warning(seen: usize, total: usize, what: &str) -> String {
    format!(
        "{seen} of {total} {what} are training questions of these particles (same image and \
         question): measured on them, the particles look better than they are on new questions; \
         use held-out questions"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn question(image: &str, text: &str) -> VqaExample {
        VqaExample {
            question_id: text.into(),
            image: image.into(),
            question: text.into(),
            answers: vec!["a".into()],
            answer_type: None,
            extra: Default::default(),
        }
    }

    #[test]
    fn keys_round_trip_and_count_the_same_questions_only() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let train = [
            question("/d/1.png", "What color?"),
            question("/d/2.png", "What color?"),
        ];
        write(dir.path(), &encode(&train)).unwrap();
        let keys = read(dir.path()).unwrap().unwrap();
        assert_eq!(keys.len(), 2);
        let val = [
            question("/d/1.png", " What color? "),
            question("/d/1.png", "What shape?"),
            question("/e/2.png", "What color?"),
        ];
        assert_eq!(count(&keys, &val), 1);
        std::fs::write(dir.path().join(FILE), [1u8, 2, 3]).unwrap();
        let err = format!("{:#}", read(dir.path()).unwrap_err());
        assert!(
            err.contains("damaged") && err.contains("delete it"),
            "{err}"
        );
        // A folder in its place: named, for reading and for writing.
        std::fs::remove_file(dir.path().join(FILE)).unwrap();
        std::fs::create_dir(dir.path().join(FILE)).unwrap();
        let err = format!("{:#}", read(dir.path()).unwrap_err());
        assert!(err.contains("not a regular file"), "{err}");
        let err = format!("{:#}", write(dir.path(), &encode(&train)).unwrap_err());
        assert!(err.contains("not a regular file"), "{err}");
    }
}
