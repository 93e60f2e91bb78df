//! `calibrate`'s answers, kept with the particles as they are made
//! (`calibrate_answers.jsonl`), so that the validation questions are not answered again when
//! the same particles are calibrated again before a calibration is stored: after a Ctrl-C, a
//! question that stopped the run (then `--skip-bad`), or a `--dry-run` followed by the run
//! that stores.
//!
//! Each line is one question's [`Scored`] matrix, with what it depends on: a fingerprint of
//! everything that makes the answers ([`fingerprint`]: the base's weights and the files that
//! configure it, the compute dtype, device and quantization, the particles' factors and
//! config, the token limit, the answer list, this version of bella-vqa), the question's image
//! and text ([`crate::data::seen::key`]) and the image file's size and modification and change
//! times. A line that does not match all of them, or whose matrix does not have the particles'
//! shape, is never used; lines of another fingerprint are dropped when the file is opened, and
//! the file is removed once a calibration is stored. The file is a cache: a line that does not
//! read back is ignored, and a file that cannot be written only means answering again next
//! time. Something other than a regular file in its place (a link, a pipe, a folder) is neither
//! read nor written through.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::answer::candidates::Scored;
use crate::answer::BellaVqa;
use crate::bella::particles::{hash_weights, ParticleSet, PARTICLES_FILE};
use crate::data::VqaExample;
use crate::io::AppendFile;

/// The file's name in the particle directory.
pub const FILE: &str = "calibrate_answers.jsonl";

/// One kept answer, as read.
#[derive(Deserialize)]
struct Line {
    fingerprint: String,
    key: u64,
    image: ImageStamp,
    scored: Scored,
}

/// [`Line`] as written.
#[derive(Serialize)]
struct LineRef<'a> {
    fingerprint: &'a str,
    key: u64,
    image: ImageStamp,
    scored: &'a Scored,
}

/// The image file as it was answered: another file under the same name is answered again (its
/// change time moves whenever it is written, also where its modification time is set back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct ImageStamp {
    bytes: u64,
    modified_ns: u128,
    changed_ns: i128,
}

impl ImageStamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        let modified = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
        #[cfg(unix)]
        let changed_ns = {
            use std::os::unix::fs::MetadataExt;
            i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec())
        };
        #[cfg(not(unix))]
        let changed_ns = 0;
        Some(Self {
            bytes: meta.len(),
            modified_ns: modified.as_nanos(),
            changed_ns,
        })
    }
}

/// The files beside the weights that change what a model answers: its architecture, image
/// preprocessing, tokenizer and chat template.
const CONFIGURING_FILES: [&str; 10] = [
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
];

/// A hex digest of everything the answers of `vqa` (with the particles in `adapters`) depend
/// on, the question aside.
pub fn fingerprint(
    vqa: &BellaVqa,
    adapters: &Path,
    max_new_tokens: usize,
    within_room: bool,
) -> Result<String> {
    let loaded = vqa.model();
    let mut config = ParticleSet::read_config(adapters)?;
    // What calibrate writes; the answers do not depend on it.
    config.abstention = None;
    let mut configuring = Vec::new();
    for name in CONFIGURING_FILES {
        if let Some(path) = loaded.files.optional(name) {
            configuring.push((name, crate::io::sha256_file(&path)?));
        }
    }
    let what = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "weights": hash_weights(&loaded.files)?,
        "configuring": configuring,
        "dtype": loaded.info.compute_dtype.as_str(),
        "device": loaded.info.device,
        "quantization": loaded.info.quantization.as_ref().map(|q| (&q.kind, q.vision)),
        "particles": crate::io::sha256_file_cached(&adapters.join(PARTICLES_FILE))?,
        "particle_config": config,
        "max_new_tokens": max_new_tokens,
        "within_room": within_room,
        "answers": vqa.answers_sha256(),
    });
    let digest = Sha256::digest(serde_json::to_vec(&what)?);
    Ok(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// The kept answers of one fingerprint, and the file new ones are appended to.
pub struct KeptAnswers {
    path: PathBuf,
    fingerprint: String,
    kept: HashMap<(u64, ImageStamp), Scored>,
    /// `None` when the file cannot be written (a read-only directory): nothing is kept then.
    file: Option<AppendFile>,
    /// Why nothing can be kept, said once.
    unwritable: Option<String>,
}

impl KeptAnswers {
    /// Reads `dir`'s file: the lines of `fingerprint` whose matrix is of `particles` particles
    /// are kept, others are dropped (the file is rewritten without them), a cut last line is cut
    /// off.
    pub fn open(dir: &Path, fingerprint: String, particles: usize) -> Self {
        let path = dir.join(FILE);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
            return Self {
                unwritable: Some(format!(
                    "{} is not a regular file (a link, a pipe or a folder), which calibrate \
                     neither reads nor writes through; remove it",
                    path.display()
                )),
                path,
                fingerprint,
                kept: HashMap::new(),
                file: None,
            };
        }
        let mut kept = HashMap::new();
        let mut others = 0usize;
        let mut whole = 0u64;
        if let Ok(Some(bytes)) = crate::input::read_if_present(&path, "kept answers") {
            for line in bytes.split_inclusive(|&b| b == b'\n') {
                if !line.ends_with(b"\n") {
                    break; // cut off by a kill: dropped below
                }
                whole += line.len() as u64;
                match serde_json::from_slice::<Line>(line) {
                    Ok(l) if l.fingerprint == fingerprint && well_formed(&l.scored, particles) => {
                        kept.insert((l.key, l.image), l.scored);
                    }
                    _ => others += 1,
                }
            }
        }
        let opened = if others > 0 {
            // Rewritten with the matching lines only (atomically: a kill leaves one or the other).
            let mut text = Vec::new();
            for ((key, image), scored) in &kept {
                write_line(&mut text, &fingerprint, *key, *image, scored);
            }
            crate::io::write_bytes_atomically(&path, &text)
                .and_then(|()| AppendFile::open(&path, None))
        } else {
            AppendFile::open(&path, Some(whole))
        };
        let (file, unwritable) = match opened {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        Self {
            path,
            fingerprint,
            kept,
            file,
            unwritable,
        }
    }

    /// How many answers the file holds for this fingerprint.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why answers cannot be kept (the file cannot be written), if so.
    pub fn unwritable(&self) -> Option<&str> {
        self.unwritable.as_deref()
    }

    /// The kept answer to `example`, if its image is the file it was answered with.
    pub fn get(&self, example: &VqaExample) -> Option<Scored> {
        let stamp = ImageStamp::of(&example.image)?;
        self.kept
            .get(&(crate::data::seen::key(example), stamp))
            .cloned()
    }

    /// Appends the answer to `example`. A failed write stops the keeping, and this call says
    /// why (once; [`KeptAnswers::unwritable`] says it after); the calibration goes on.
    pub fn keep(&mut self, example: &VqaExample, scored: &Scored) -> Option<&str> {
        let (Some(file), Some(stamp)) = (self.file.as_mut(), ImageStamp::of(&example.image)) else {
            return None;
        };
        let mut line = Vec::new();
        let key = crate::data::seen::key(example);
        write_line(&mut line, &self.fingerprint, key, stamp, scored);
        let Err(e) = file.append(&line) else {
            return None;
        };
        self.file = None;
        Some(self.unwritable.insert(format!("{e:#}")).as_str())
    }

    /// Removes the file (the calibration it served is stored). A file that cannot be removed
    /// stays: it is only read again by this fingerprint, whose answers it holds.
    pub fn remove(self) {
        drop(self.file);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `scored` is a matrix the particles could have made: a row of probabilities for each
/// particle, over the candidates (and the other answers' mass), every number finite.
fn well_formed(scored: &Scored, particles: usize) -> bool {
    let columns = scored.candidates.len() + usize::from(scored.other);
    scored.particle_answers.len() == particles
        && scored.probs.len() == particles
        && !scored.candidates.is_empty()
        && scored
            .probs
            .iter()
            .all(|row| row.len() == columns && row.iter().all(|p| p.is_finite() && *p >= 0.0))
}

fn write_line(out: &mut Vec<u8>, fingerprint: &str, key: u64, image: ImageStamp, scored: &Scored) {
    let line = LineRef {
        fingerprint,
        key,
        image,
        scored,
    };
    // Plain data always serialises (a non-finite number as null, which does not read back: that
    // line is answered again).
    if serde_json::to_writer(&mut *out, &line).is_ok() {
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::candidates::ParticleAnswer;

    fn question(image: &Path, text: &str) -> VqaExample {
        VqaExample {
            question_id: text.into(),
            image: image.to_path_buf(),
            question: text.into(),
            answers: vec!["red".into()],
            answer_type: None,
            extra: Default::default(),
        }
    }

    /// An image file `name` in `dir` (its bytes only matter by their size and times).
    fn image_in(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, b"one").unwrap();
        path
    }

    /// Numbers that a lossy float parser would change in their last bit.
    fn scored(seed: f64) -> Scored {
        Scored {
            particle_answers: vec![ParticleAnswer {
                answer: "Red.".into(),
                normalized: "red".into(),
                log_likelihood: -0.1 * seed - 1e-17,
                truncated: false,
            }],
            candidates: vec!["Red.".into(), "blue".into()],
            probs: vec![vec![0.1 + 0.2 * seed, 1.0 / 3.0, 2.220446049250313e-16]],
            other: true,
            prompt_tokens: 601,
            generated_tokens: 3,
            image_features: Some(vec![0.1f32, -7.5e-39, f32::MAX]),
        }
    }

    #[test]
    fn kept_answers_read_back_exactly_and_only_for_their_fingerprint_and_image() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (image_in(dir.path(), "a.png"), image_in(dir.path(), "b.png"));
        let (qa, qb) = (question(&a, "What color?"), question(&b, "What color?"));
        let mut kept = KeptAnswers::open(dir.path(), "f1".into(), 1);
        assert!(kept.is_empty() && kept.unwritable().is_none());
        kept.keep(&qa, &scored(1.0));
        kept.keep(&qb, &scored(2.0));
        drop(kept);

        let kept = KeptAnswers::open(dir.path(), "f1".into(), 1);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept.get(&qa), Some(scored(1.0)));
        assert_eq!(kept.get(&qb), Some(scored(2.0)));
        assert_eq!(kept.get(&question(&a, "What shape?")), None);
        drop(kept);

        // Another image under the same name is answered again.
        std::fs::write(&b, b"three").unwrap();
        let kept = KeptAnswers::open(dir.path(), "f1".into(), 1);
        assert_eq!(kept.get(&qb), None);
        assert_eq!(kept.get(&qa), Some(scored(1.0)));
        drop(kept);

        // Another fingerprint (retrained particles, another dtype): nothing is used, and the
        // old lines are dropped from the file.
        let mut kept = KeptAnswers::open(dir.path(), "f2".into(), 1);
        assert!(kept.is_empty());
        kept.keep(&qa, &scored(3.0));
        drop(kept);
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert_eq!(
            KeptAnswers::open(dir.path(), "f2".into(), 1).get(&qa),
            Some(scored(3.0))
        );
    }

    #[test]
    fn a_line_cut_by_a_kill_is_dropped_and_a_bad_line_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let image = image_in(dir.path(), "a.png");
        let q = question(&image, "What color?");
        let mut kept = KeptAnswers::open(dir.path(), "f".into(), 1);
        kept.keep(&q, &scored(1.0));
        drop(kept);
        let path = dir.path().join(FILE);
        let whole = std::fs::read(&path).unwrap();
        let mut damaged = b"not json\n".to_vec();
        damaged.extend_from_slice(&whole);
        damaged.extend_from_slice(&whole[..whole.len() / 2]);
        std::fs::write(&path, &damaged).unwrap();

        let mut kept = KeptAnswers::open(dir.path(), "f".into(), 1);
        assert_eq!(kept.get(&q), Some(scored(1.0)));
        let other = question(&image, "What shape?");
        kept.keep(&other, &scored(2.0));
        drop(kept);
        let kept = KeptAnswers::open(dir.path(), "f".into(), 1);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept.get(&other), Some(scored(2.0)));
        kept.remove();
        assert!(!path.exists());
    }

    /// A link in the file's place is not followed (the file it names outside the particles
    /// was rewritten, or cut to nothing), nor a pipe opened (it blocked calibrate for good).
    #[cfg(unix)]
    #[test]
    fn a_link_or_a_pipe_in_the_files_place_is_neither_read_nor_written() {
        let dir = tempfile::tempdir().unwrap();
        let image = image_in(dir.path(), "a.png");
        let outside = dir.path().join("notes.txt");
        std::fs::write(&outside, b"line1\nline2\npartial").unwrap();
        let particles = dir.path().join("particles");
        std::fs::create_dir(&particles).unwrap();
        std::os::unix::fs::symlink(&outside, particles.join(FILE)).unwrap();
        let mut kept = KeptAnswers::open(&particles, "f".into(), 1);
        assert!(kept.unwritable().unwrap().contains("not a regular file"));
        kept.keep(&question(&image, "What color?"), &scored(1.0));
        assert_eq!(std::fs::read(&outside).unwrap(), b"line1\nline2\npartial");

        std::fs::remove_file(particles.join(FILE)).unwrap();
        let fifo = particles.join(FILE);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let kept = KeptAnswers::open(&particles, "f".into(), 1);
            let _ = tx.send(kept.unwritable().map(str::to_string));
        });
        let why = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("open returns without a writer on the pipe");
        assert!(why.unwrap().contains("not a regular file"));
    }

    /// A line of the right fingerprint whose matrix is not of the particles' shape (an edited
    /// file, another particle count) is not used: it failed the calibration at every rerun.
    #[test]
    fn a_matrix_of_another_shape_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let image = image_in(dir.path(), "a.png");
        let q = question(&image, "What color?");
        let mut bad = scored(1.0);
        bad.probs[0].pop();
        let mut kept = KeptAnswers::open(dir.path(), "f".into(), 1);
        kept.keep(&q, &bad);
        drop(kept);
        assert!(KeptAnswers::open(dir.path(), "f".into(), 1).is_empty());
        let mut kept = KeptAnswers::open(dir.path(), "f".into(), 1);
        kept.keep(&q, &scored(1.0));
        drop(kept);
        assert_eq!(KeptAnswers::open(dir.path(), "f".into(), 1).len(), 1);
        assert!(KeptAnswers::open(dir.path(), "f".into(), 2).is_empty());
    }

    #[test]
    fn an_unwritable_directory_keeps_nothing_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let image = image_in(dir.path(), "a.png");
        // A directory in the file's place cannot be appended to.
        std::fs::create_dir(dir.path().join(FILE)).unwrap();
        let mut kept = KeptAnswers::open(dir.path(), "f".into(), 1);
        assert!(kept.unwritable().is_some());
        kept.keep(&question(&image, "What color?"), &scored(1.0));
        assert!(kept.is_empty());
    }
}
