//! Hugging Face `datasets` Parquet files: the benchmarks as lmms-eval users have them
//! (`~/.cache/huggingface/hub/datasets--lmms-lab--VQAv2/snapshots/REV/data/validation-00000-of-00068.parquet`).
//!
//! Columns are told apart by name, as lmms-eval's tasks read them:
//! - the question id: `question_id`, else `questionId` (DocVQA), else `id` (GQA), an integer or a
//!   string; without any, the row's position in the split (0-based, as `datasets` counts);
//! - the question: `question` (a string);
//! - the answers: `answers`, a list of strings (TextVQA, VizWiz, OK-VQA) or of `{answer, …}`
//!   structs (VQAv2's `{answer, answer_confidence, answer_id}`); without it, `multiple_choice_answer`
//!   or `answer`, one string (ChartQA, GQA). A null is no answers: a file without answers is a test
//!   set, as for the JSON formats;
//! - `answer_type`, kept as the example's;
//! - the image: `image`, the `datasets` `Image` feature (a struct `{bytes, path}`), a plain binary
//!   column, or a string path; else the one column of `Image` type. Embedded bytes are written once
//!   to `<cache>/images/<sha256>.<ext>` ([`image_cache`]), which becomes the example's image, so the
//!   rest of the program sees image files as from any other reader. They are checked first, as
//!   image files are (`models::image`), and a refused one is named by its Parquet file and row
//!   and its question, not by a cache file. A path without bytes (images
//!   not embedded) is looked up in the images folder (`--images`, by default the data's folder).
//!   GQA's questions (lmms-lab/GQA `testdev_balanced_instructions`) have no image but an `imageId`:
//!   its image is `IMAGE_ID.jpg` in the images folder (or its `images/` folder), as for GQA's JSON,
//!   or, when `--images` is Parquet (lmms-lab/GQA `testdev_balanced_images`: `id`, `image`; a file
//!   or one split's shards), the image of the row whose `id` is the `imageId` (`ImagesFile`):
//!   only the images of the questions read are extracted;
//! - every other column that holds no binary data goes to `extra`, as JSON.
//!
//! A folder holds the shards of one split (`validation-00000-of-00068.parquet`, …; a hub snapshot's
//! `data/` folder is looked into), read in shard order. Rows are read one at a time: with a limit,
//! the rows after it are not read and their images not extracted ([`Dataset::unread`]).
//!
//! Compressions read: none, snappy (what pyarrow and `datasets` write) and gzip; another (zstd,
//! brotli, …) is refused, named, before any row is read.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use anyhow::{bail, Context};
use parquet::basic::{Compression, ConvertedType, LogicalType, Repetition, Type as Physical};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::{Type, TypePtr};
use serde_json::Map;

use super::benchmarks::find_image;
use super::vqa::{
    check_image_dir, folder_of, resolve, Collector, DataFormat, Dataset, ReadOptions,
};
use super::vqa::{VqaExample, MAX_ANSWERS};

/// Where embedded images are extracted: `<cache>/images` ([`crate::io::cache_dir`]).
pub fn image_cache() -> anyhow::Result<PathBuf> {
    Ok(crate::io::cache_dir()?.join("images"))
}

/// Whether `path` is read by this reader: a `.parquet` file, or a folder of them (directly or
/// in its `data/` folder, as a hub snapshot holds them).
pub fn is_parquet(path: &Path) -> bool {
    if path.is_dir() {
        shard_folder(path).is_some()
    } else {
        has_parquet_extension(path)
    }
}

fn has_parquet_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// The folder of `dir` that holds Parquet files: `dir` itself, or its `data/` folder.
fn shard_folder(dir: &Path) -> Option<PathBuf> {
    let holds_parquet = |d: &Path| {
        fs::read_dir(d).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| has_parquet_extension(&e.path()) && !is_hidden(&e.path()))
        })
    };
    [dir.to_path_buf(), dir.join("data")]
        .into_iter()
        .find(|d| holds_parquet(d))
}

/// Dot files: a temporary file of a download or of our own atomic writes.
fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The Parquet files of a data path, in reading order: the file itself, or the shards of the one
/// split a folder holds. Several splits, or a split with shards missing, are an error that lists
/// them.
pub fn shards(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let Some(dir) = shard_folder(path) else {
        bail!("{} holds no .parquet files", path.display());
    };
    let entries = fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
    // Split name → (shard index, shard count, file), from `{split}-{i}-of-{n}[-{hash}].parquet`
    // (what `datasets` names the shards it pushes), or `{i}.parquet` (the hub's converted
    // Parquet, `{config}/{split}/0000.parquet`: the folder is the split); a file named otherwise
    // is a split of its own.
    let mut splits: BTreeMap<String, Vec<(usize, Option<usize>, PathBuf)>> = BTreeMap::new();
    for entry in entries {
        let file = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if !has_parquet_extension(&file) || is_hidden(&file) {
            continue;
        }
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let numbered = stem
            .parse::<usize>()
            .ok()
            .filter(|_| stem.bytes().all(|b| b.is_ascii_digit()));
        let (split, index, count) = match (shard_name(&stem), numbered) {
            (Some((split, i, n)), _) => (split, i, Some(n)),
            (None, Some(i)) => (folder_split(&dir), i, None),
            (None, None) => (stem, 0, None),
        };
        splits.entry(split).or_default().push((index, count, file));
    }
    if splits.len() > 1 {
        let listed: Vec<String> = splits
            .iter()
            .map(|(split, files)| format!("{split} ({} file(s))", files.len()))
            .collect();
        bail!(
            "{} holds the Parquet files of several splits: {}; give one file, or a folder that \
             holds the shards of one split",
            dir.display(),
            listed.join(", ")
        );
    }
    let Some((split, mut files)) = splits.pop_first() else {
        bail!("{} holds no .parquet files", dir.display());
    };
    files.sort();
    if let Some(n) = files[0].1 {
        let missing: Vec<String> = (0..n)
            .filter(|i| !files.iter().any(|f| f.0 == *i))
            .map(|i| format!("{i:05}"))
            .collect();
        if !missing.is_empty() || files.len() != n {
            bail!(
                "{} holds {} of the {n} shards of split {split} (missing: {}): a part of a split \
                 is not the benchmark; fetch the missing shards, or give one shard file",
                dir.display(),
                files.len(),
                if missing.is_empty() {
                    "none, but some are named twice".to_string()
                } else {
                    missing.join(", ")
                }
            );
        }
    }
    Ok(files.into_iter().map(|(_, _, f)| f).collect())
}

/// The split a folder of numbered shards holds: the folder's name (`…/default/validation/`).
fn folder_split(dir: &Path) -> String {
    dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// `("validation", 3, 68)` from `validation-00003-of-00068` or
/// `validation-00003-of-00068-8f9c2b1e4d6a7f0b` (older `datasets` add a fingerprint).
fn shard_name(stem: &str) -> Option<(String, usize, usize)> {
    let parts: Vec<&str> = stem.split('-').collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let at = (1..parts.len().saturating_sub(2))
        .rev()
        .find(|&k| parts[k + 1] == "of" && digits(parts[k]) && digits(parts[k + 2]))?;
    // At most a fingerprint after the count.
    if parts.len() > at + 4 {
        return None;
    }
    let (index, count) = (parts[at].parse().ok()?, parts[at + 2].parse().ok()?);
    (index < count).then(|| (parts[..at].join("-"), index, count))
}

/// Reads a Parquet file, or a folder of one split's shards (see the module's page), at most
/// `limit` good questions; embedded images are extracted into `image_cache`.
pub fn read_parquet(
    path: &Path,
    image_dir: Option<&Path>,
    opts: &ReadOptions,
    limit: Option<usize>,
    image_cache: &Path,
) -> anyhow::Result<Dataset> {
    let files = shards(path)?;
    let images_given = image_dir;
    let image_dir = match image_dir {
        Some(dir) => dir.to_path_buf(),
        None if path.is_dir() => path.to_path_buf(),
        None => match folder_of(path) {
            dir if dir.as_os_str().is_empty() => PathBuf::from("."),
            dir => dir.to_path_buf(),
        },
    };
    let mut c = Collector::new(opts);
    let mut unread = 0u64;
    let mut position = 0usize;
    // GQA's images as Parquet (`--images` names them), indexed when the first questions need it.
    let mut gqa: Option<ImagesFile> = None;
    for file in &files {
        let reader = open(file)?;
        let rows = reader.metadata().file_metadata().num_rows().max(0) as u64;
        if limit.is_some_and(|l| c.accepted() >= l) {
            unread += rows;
            continue;
        }
        let columns = Columns::of(file, reader.metadata().file_metadata().schema())?;
        let join = match (&columns.image, images_given) {
            (ImageColumn::GqaImageId(_), Some(given)) if is_parquet(given) => {
                if gqa.is_none() {
                    gqa = Some(ImagesFile::index(given)?);
                }
                true
            }
            (ImageColumn::GqaImageId(_), _) => {
                gqa_image_folder(file, &image_dir)?;
                false
            }
            _ => false,
        };
        check_compression(file, &reader, &columns.projection)?;
        // Under the file's own root name: pyarrow writes "schema", Spark "spark_schema", Polars
        // "root", DuckDB "duckdb_schema", and the reader refuses a projection named otherwise.
        let root = reader
            .metadata()
            .file_metadata()
            .schema()
            .name()
            .to_string();
        let projection = Type::group_type_builder(&root)
            .with_fields(columns.projection.clone())
            .build()
            .with_context(|| format!("cannot read the columns of {}", file.display()))?;
        let mut iter = decode(|| reader.get_row_iter(Some(projection)))
            .map_err(|why| damaged(file, None, &why))?;
        let mut read = 0u64;
        // Rows are taken one at a time; joined to GQA's images as Parquet, in batches, so that
        // one pass over the images file extracts the images a batch names. A batch holds at most
        // the questions the limit still wants: no image of a row past the limit is extracted.
        'rows: loop {
            let size = match (join, limit) {
                (false, _) => 1,
                (true, Some(l)) => l.saturating_sub(c.accepted()).clamp(1, JOIN_BATCH),
                (true, None) => JOIN_BATCH,
            };
            let mut batch = Vec::with_capacity(size);
            while batch.len() < size {
                let at = usize::try_from(read).unwrap_or(usize::MAX) + batch.len();
                match decode(|| iter.next().transpose())
                    .map_err(|why| damaged(file, Some(at), &why))?
                {
                    Some(row) => batch.push(row),
                    None => break,
                }
            }
            let last = batch.len() < size;
            if let (true, Some(images), ImageColumn::GqaImageId(name)) =
                (join, gqa.as_mut(), &columns.image)
            {
                let ids = batch.iter().filter_map(|row| gqa_image_id(row, name));
                images.extract(ids, image_cache, opts.check_images)?;
            }
            let images = ImageSource {
                dir: &image_dir,
                cache: image_cache,
                decode: opts.check_images,
                gqa: gqa.as_ref().filter(|_| join),
            };
            for row in batch {
                let row_index = usize::try_from(read).unwrap_or(usize::MAX);
                read += 1;
                let question_position = position;
                position += 1;
                match example(&row, &columns, question_position, file, row_index, &images) {
                    Ok((example, checked)) => {
                        if checked {
                            c.image_checked(&example.image);
                        }
                        c.accept(file, None, example)?
                    }
                    Err(Bad::Row(reason)) => {
                        c.bad(file, None, format!("row {row_index}: {reason}"))?
                    }
                    Err(Bad::Question(id, reason)) => c.bad(
                        file,
                        None,
                        format!("question {id} (row {row_index}): {reason}"),
                    )?,
                    Err(Bad::Io(e)) => return Err(e),
                }
                if limit.is_some_and(|l| c.accepted() >= l) {
                    break 'rows;
                }
            }
            if last {
                break;
            }
        }
        unread += rows.saturating_sub(read);
    }
    let mut data = c.finish(path, DataFormat::Parquet)?;
    data.unread = usize::try_from(unread).unwrap_or(usize::MAX);
    Ok(data)
}

/// Opens one Parquet file; a file that is none (or is cut short) is named as such.
fn open(file: &Path) -> anyhow::Result<SerializedFileReader<fs::File>> {
    let mut f = crate::input::open(file, "data file")?;
    let mut magic = [0u8; 4];
    let starts_as_parquet = f.read_exact(&mut magic).is_ok() && &magic == b"PAR1";
    // The reader seeks to each part it reads: where `f` stands does not matter.
    decode(|| SerializedFileReader::new(f)).map_err(|e| {
        if starts_as_parquet {
            anyhow::anyhow!(
                "{} is a truncated or damaged Parquet file ({e}); its end (Parquet's footer) \
                 cannot be read: a partial download or copy? fetch it again",
                file.display()
            )
        } else {
            anyhow::anyhow!(
                "{} is not a Parquet file (it does not start with Parquet's PAR1 marker): give \
                 a .parquet file as written by Hugging Face datasets or pyarrow",
                file.display()
            )
        }
    })
}

/// A read error after the footer was read: damaged data pages, at `row` when rows were read.
fn damaged(file: &Path, row: Option<usize>, why: &str) -> anyhow::Error {
    let at = row.map_or(String::new(), |r| format!(" at row {r}"));
    anyhow::anyhow!(
        "cannot read {}{at} ({why}): the file is damaged (a partial download or copy?); fetch it \
         again",
        file.display()
    )
}

/// Runs a call into the Parquet decoder, which reports most damage as errors but panics on some
/// (an assertion on a page's length, found with a flipped byte: tests/parquet.rs): either is
/// returned as the text of what went wrong. The decoder's state after a panic is not used again.
fn decode<T>(call: impl FnOnce() -> parquet::errors::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| quiet_panics(call))) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(panic) => Err(panic_message(panic.as_ref())),
    }
}

thread_local! {
    /// Set while this thread is in the Parquet decoder: its panics are reported as errors.
    static IN_DECODER: Cell<bool> = const { Cell::new(false) };
}

/// Runs `call` with the panic message of this thread left unprinted (the error that [`decode`]
/// makes of it says what happened); other threads' panics print as before.
fn quiet_panics<T>(call: impl FnOnce() -> T) -> T {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_DECODER.with(Cell::get) {
                previous(info);
            }
        }));
    });
    // Reset on the way out, by a return or a panic.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_DECODER.with(|d| d.set(false));
        }
    }
    IN_DECODER.with(|d| d.set(true));
    let _reset = Reset;
    call()
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown failure".into());
    format!("the Parquet decoder failed: {text}")
}

/// Refuses a compression this build cannot read, naming it, before any row is read.
fn check_compression(
    file: &Path,
    reader: &SerializedFileReader<fs::File>,
    projection: &[TypePtr],
) -> anyhow::Result<()> {
    let wanted: Vec<&str> = projection.iter().map(|t| t.name()).collect();
    for group in reader.metadata().row_groups() {
        for column in group.columns() {
            let top = column.column_path().parts().first().map(String::as_str);
            if !top.is_some_and(|t| wanted.contains(&t)) {
                continue;
            }
            match column.compression() {
                Compression::UNCOMPRESSED | Compression::SNAPPY | Compression::GZIP(_) => {}
                other => {
                    let name = format!("{other:?}");
                    let name = name.split('(').next().unwrap_or(&name);
                    bail!(
                        "{} is compressed with {name} (column {}), which bella-vqa does not \
                         read (it reads uncompressed, SNAPPY and GZIP Parquet files): \
                         rewrite it, e.g. with pyarrow: pq.write_table(pq.read_table(\"in.parquet\"), \
                         \"out.parquet\", compression=\"snappy\")",
                        file.display(),
                        column.column_path().string()
                    )
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Columns
// ---------------------------------------------------------------------------------------------

/// A column's type, as far as the reader tells them apart (and names them in messages).
#[derive(Clone, Debug, PartialEq)]
enum ColumnType {
    Bool,
    Int,
    Float,
    Str,
    Binary,
    /// Dates, times, decimals, …: kept in `extra` as the text the record API gives.
    Other(&'static str),
    List(Box<ColumnType>),
    Struct(Vec<(String, ColumnType)>),
    Map,
}

impl ColumnType {
    fn of(t: &Type) -> Self {
        let info = t.get_basic_info();
        let repeated = info.has_repetition() && info.repetition() == Repetition::REPEATED;
        let plain = if t.is_primitive() {
            primitive(t)
        } else if info.converted_type() == ConvertedType::LIST
            || matches!(info.logical_type_ref(), Some(LogicalType::List))
        {
            // 3-level lists (`list` { `element` }), or the legacy 2-level ones.
            let element = match t.get_fields() {
                [repeated] if repeated.is_group() && repeated.get_fields().len() == 1 => {
                    ColumnType::of_element(&repeated.get_fields()[0])
                }
                [repeated] => ColumnType::of_element(repeated),
                _ => ColumnType::Other("list"),
            };
            ColumnType::List(Box::new(element))
        } else if matches!(
            info.converted_type(),
            ConvertedType::MAP | ConvertedType::MAP_KEY_VALUE
        ) || matches!(info.logical_type_ref(), Some(LogicalType::Map))
        {
            ColumnType::Map
        } else {
            ColumnType::Struct(
                t.get_fields()
                    .iter()
                    .map(|f| (f.name().to_string(), ColumnType::of(f)))
                    .collect(),
            )
        };
        if repeated {
            ColumnType::List(Box::new(plain))
        } else {
            plain
        }
    }

    /// A list's element (its own repetition is the list's).
    fn of_element(t: &Type) -> Self {
        match ColumnType::of(t) {
            ColumnType::List(inner) if t.get_basic_info().repetition() == Repetition::REPEATED => {
                *inner
            }
            other => other,
        }
    }

    /// Whether binary data is anywhere in it (such a column is not kept in `extra`).
    fn holds_binary(&self) -> bool {
        match self {
            ColumnType::Binary => true,
            ColumnType::List(e) => e.holds_binary(),
            ColumnType::Struct(fields) => fields.iter().any(|(_, t)| t.holds_binary()),
            _ => false,
        }
    }

    /// The `datasets` `Image` feature: a struct with `bytes` (binary) and `path` (string).
    fn is_image_struct(&self) -> bool {
        let ColumnType::Struct(fields) = self else {
            return false;
        };
        fields
            .iter()
            .any(|(n, t)| n == "bytes" && *t == ColumnType::Binary)
            && fields
                .iter()
                .all(|(n, t)| matches!((n.as_str(), t), ("bytes", _) | ("path", ColumnType::Str)))
    }
}

fn primitive(t: &Type) -> ColumnType {
    let info = t.get_basic_info();
    match info.logical_type_ref() {
        Some(LogicalType::String | LogicalType::Enum | LogicalType::Json) => {
            return ColumnType::Str
        }
        Some(LogicalType::Decimal { .. }) => return ColumnType::Other("decimal"),
        Some(LogicalType::Date) => return ColumnType::Other("date"),
        Some(LogicalType::Time { .. }) => return ColumnType::Other("time"),
        Some(LogicalType::Timestamp { .. }) => return ColumnType::Other("timestamp"),
        Some(LogicalType::Float16) => return ColumnType::Float,
        _ => {}
    }
    match info.converted_type() {
        ConvertedType::UTF8 | ConvertedType::ENUM | ConvertedType::JSON => return ColumnType::Str,
        ConvertedType::DECIMAL => return ColumnType::Other("decimal"),
        ConvertedType::DATE => return ColumnType::Other("date"),
        ConvertedType::TIME_MILLIS | ConvertedType::TIME_MICROS => {
            return ColumnType::Other("time")
        }
        ConvertedType::TIMESTAMP_MILLIS | ConvertedType::TIMESTAMP_MICROS => {
            return ColumnType::Other("timestamp")
        }
        _ => {}
    }
    match t.get_physical_type() {
        Physical::BOOLEAN => ColumnType::Bool,
        Physical::INT32 | Physical::INT64 => ColumnType::Int,
        Physical::INT96 => ColumnType::Other("timestamp"),
        Physical::FLOAT | Physical::DOUBLE => ColumnType::Float,
        Physical::BYTE_ARRAY | Physical::FIXED_LEN_BYTE_ARRAY => ColumnType::Binary,
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::Bool => f.write_str("bool"),
            ColumnType::Int => f.write_str("integer"),
            ColumnType::Float => f.write_str("float"),
            ColumnType::Str => f.write_str("string"),
            ColumnType::Binary => f.write_str("binary"),
            ColumnType::Other(name) => f.write_str(name),
            ColumnType::List(e) => write!(f, "list<{e}>"),
            ColumnType::Struct(fields) => {
                let fields: Vec<String> = fields.iter().map(|(n, t)| format!("{n}: {t}")).collect();
                write!(f, "struct<{}>", fields.join(", "))
            }
            ColumnType::Map => f.write_str("map"),
        }
    }
}

/// Where a row's answers are.
enum AnswerColumn {
    /// `answers`: a list of strings or of `{answer, …}`.
    List(String),
    /// `multiple_choice_answer` or `answer`: one string.
    One(String),
    None,
}

/// Where a row's image is.
enum ImageColumn {
    /// The `Image` feature, `{bytes, path}`.
    Struct(String),
    /// The bytes of the image.
    Binary(String),
    /// A path, looked up in the images folder.
    Path(String),
    /// GQA: `IMAGE_ID.jpg` in the images folder.
    GqaImageId(String),
}

/// The roles of a file's columns, and the columns read.
struct Columns {
    id: Option<String>,
    question: String,
    answers: AnswerColumn,
    answer_type: Option<String>,
    image: ImageColumn,
    extra: Vec<String>,
    /// The top-level columns read (binary ones that no role takes are left out, unread).
    projection: Vec<TypePtr>,
}

impl Columns {
    fn of(file: &Path, root: &Type) -> anyhow::Result<Self> {
        let fields: Vec<(String, ColumnType, TypePtr)> = root
            .get_fields()
            .iter()
            .map(|f| (f.name().to_string(), ColumnType::of(f), Arc::clone(f)))
            .collect();
        let type_of = |name: &str| fields.iter().find(|f| f.0 == name).map(|f| &f.1);
        let listing = || {
            fields
                .iter()
                .map(|(n, t, _)| format!("{n} ({t})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let unsupported = |name: &str, t: &ColumnType, wanted: &str| {
            anyhow::anyhow!(
                "{}: column \"{name}\" is {t}, which bella-vqa does not read as {wanted}",
                file.display()
            )
        };
        let question = match type_of("question") {
            Some(ColumnType::Str) => "question".to_string(),
            Some(t) => return Err(unsupported("question", t, "the question (a string)")),
            None => bail!(
                "{}: no \"question\" column; its columns are {}. bella-vqa reads the question \
                 from \"question\" (a string): rename the column, e.g. with datasets: \
                 ds.rename_column(\"text\", \"question\")",
                file.display(),
                listing()
            ),
        };
        let id = ["question_id", "questionId", "id"]
            .into_iter()
            .find_map(|name| type_of(name).map(|t| (name, t)));
        let id = match id {
            Some((name, ColumnType::Int | ColumnType::Str)) => Some(name.to_string()),
            Some((name, t)) => {
                return Err(unsupported(
                    name,
                    t,
                    "the question id (an integer or a string)",
                ))
            }
            None => None,
        };
        let answers = match type_of("answers") {
            Some(ColumnType::List(e)) if answer_element(e) => AnswerColumn::List("answers".into()),
            Some(t) => return Err(unsupported(
                "answers",
                t,
                "the human answers (a list of strings, or of structs with an \"answer\" string)",
            )),
            None => match ["multiple_choice_answer", "answer"]
                .into_iter()
                .find_map(|name| type_of(name).map(|t| (name, t)))
            {
                Some((name, ColumnType::Str)) => AnswerColumn::One(name.to_string()),
                Some((name, t)) => return Err(unsupported(name, t, "the answer (a string)")),
                None => AnswerColumn::None,
            },
        };
        let answer_type = match type_of("answer_type") {
            Some(ColumnType::Str) => Some("answer_type".to_string()),
            Some(t) => return Err(unsupported("answer_type", t, "the answer type (a string)")),
            None => None,
        };
        let image =
            match type_of("image") {
                Some(t) if t.is_image_struct() => ImageColumn::Struct("image".into()),
                Some(ColumnType::Binary) => ImageColumn::Binary("image".into()),
                Some(ColumnType::Str) => ImageColumn::Path("image".into()),
                Some(t) => return Err(unsupported(
                    "image",
                    t,
                    "the question's image (the datasets Image feature {bytes, path}, the image's \
                     bytes, or its path; one image per question)",
                )),
                None => {
                    let images: Vec<&str> = fields
                        .iter()
                        .filter(|f| f.1.is_image_struct())
                        .map(|f| f.0.as_str())
                        .collect();
                    match (images.as_slice(), type_of("imageId")) {
                        ([one], _) => ImageColumn::Struct(one.to_string()),
                        ([], Some(ColumnType::Str)) => ImageColumn::GqaImageId("imageId".into()),
                        ([], _) => bail!(
                        "{}: no image column; its columns are {}. bella-vqa reads the image from \
                         \"image\" (the datasets Image feature, the image's bytes or its path), \
                         or GQA's \"imageId\" with --images",
                        file.display(),
                        listing()
                    ),
                        (many, _) => bail!(
                        "{}: several image columns ({}); bella-vqa reads one image per question, \
                         from the column named \"image\"",
                        file.display(),
                        many.join(", ")
                    ),
                    }
                }
            };
        let image_name = match &image {
            ImageColumn::Struct(n)
            | ImageColumn::Binary(n)
            | ImageColumn::Path(n)
            | ImageColumn::GqaImageId(n) => n.clone(),
        };
        let taken: Vec<&str> = [
            id.as_deref(),
            Some(question.as_str()),
            match &answers {
                AnswerColumn::List(n) | AnswerColumn::One(n) => Some(n.as_str()),
                AnswerColumn::None => None,
            },
            answer_type.as_deref(),
            // GQA's imageId is kept in `extra`, as its JSON reader keeps it.
            (!matches!(image, ImageColumn::GqaImageId(_))).then_some(image_name.as_str()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let extra: Vec<String> = fields
            .iter()
            .filter(|(n, t, _)| !taken.contains(&n.as_str()) && !t.holds_binary())
            .map(|(n, _, _)| n.clone())
            .collect();
        let projection = fields
            .iter()
            .filter(|(n, _, _)| taken.contains(&n.as_str()) || extra.contains(n))
            .map(|(_, _, t)| Arc::clone(t))
            .collect();
        Ok(Columns {
            id,
            question,
            answers,
            answer_type,
            image,
            extra,
            projection,
        })
    }
}

/// Whether a list of answers holds strings, or structs with an `answer` string.
fn answer_element(t: &ColumnType) -> bool {
    match t {
        ColumnType::Str => true,
        ColumnType::Struct(fields) => fields
            .iter()
            .any(|(n, t)| n == "answer" && *t == ColumnType::Str),
        _ => false,
    }
}

/// Checks the images folder of GQA's questions (IMAGE_ID.jpg files).
fn gqa_image_folder(file: &Path, image_dir: &Path) -> anyhow::Result<()> {
    check_image_dir(image_dir).with_context(|| {
        format!(
            "{}: GQA's questions name their images by \"imageId\": give the folder that holds \
             IMAGE_ID.jpg files, or the Parquet file of lmms-lab/GQA's images \
             (testdev_balanced_images), as --images",
            file.display()
        )
    })
}

/// How many GQA questions are read before their images are extracted, in one pass over the
/// images file (a batch's rows are held in memory).
const JOIN_BATCH: usize = 16_384;

/// `imageId` of a GQA question row, when it is a non-empty string.
fn gqa_image_id<'a>(row: &'a Row, name: &str) -> Option<&'a str> {
    match field(row, name) {
        Field::Str(id) if !id.trim().is_empty() => Some(id.as_str()),
        _ => None,
    }
}

/// GQA's images as Parquet (lmms-lab/GQA's `testdev_balanced_images`: an `id` string and an
/// `image`, the `datasets` `Image` feature or the image's bytes), a file or a folder of one split's
/// shards, joined to the questions by their `imageId`. Only the `id` column is read whole (an
/// index); an image is extracted when a question read names it.
struct ImagesFile {
    /// As given (`--images`).
    given: PathBuf,
    shards: Vec<Shard>,
    /// Where each id's image is: (shard, row group, row in the shard). The first row of an id
    /// that several rows hold.
    index: HashMap<String, (usize, usize, usize)>,
    /// The images extracted so far, by id: their cache file, or why they are not usable.
    extracted: HashMap<String, Result<PathBuf, String>>,
}

/// One Parquet file of GQA's images.
struct Shard {
    file: PathBuf,
    /// Its `id` and `image` columns, under its root's name.
    projection: Type,
    /// Whether `image` is the `Image` feature (`{bytes, path}`), not the bytes themselves.
    image_struct: bool,
}

impl ImagesFile {
    /// Reads the `id` column of the images file `given`.
    fn index(given: &Path) -> anyhow::Result<Self> {
        let mut images = ImagesFile {
            given: given.to_path_buf(),
            shards: Vec::new(),
            index: HashMap::new(),
            extracted: HashMap::new(),
        };
        for (s, file) in shards(given)?.into_iter().enumerate() {
            let reader = open(&file)?;
            let schema = reader.metadata().file_metadata().schema();
            let column = |name: &str| {
                schema
                    .get_fields()
                    .iter()
                    .find(|f| f.name() == name)
                    .map(|f| (ColumnType::of(f), Arc::clone(f)))
            };
            let (id, image, image_struct) = match (column("id"), column("image")) {
                (Some((ColumnType::Str, id)), Some((t, image)))
                    if t.is_image_struct() || t == ColumnType::Binary =>
                {
                    (id, image, t.is_image_struct())
                }
                _ => {
                    let listing: Vec<String> = schema
                        .get_fields()
                        .iter()
                        .map(|f| format!("{} ({})", f.name(), ColumnType::of(f)))
                        .collect();
                    bail!(
                        "{} is no Parquet file of GQA's images: its columns are {}; bella-vqa \
                         joins GQA's questions (\"imageId\") to an \"id\" string and an \
                         \"image\" (the datasets Image feature, or the image's bytes), as \
                         lmms-lab/GQA's testdev_balanced_images holds them",
                        file.display(),
                        listing.join(", ")
                    )
                }
            };
            check_compression(&file, &reader, &[Arc::clone(&id), Arc::clone(&image)])?;
            let root = schema.name().to_string();
            let group = |fields: Vec<TypePtr>| {
                Type::group_type_builder(&root)
                    .with_fields(fields)
                    .build()
                    .with_context(|| format!("cannot read the columns of {}", file.display()))
            };
            let ids = group(vec![Arc::clone(&id)])?;
            let projection = group(vec![id, image])?;
            let mut row = 0usize;
            for g in 0..reader.num_row_groups() {
                let rows = decode(|| reader.get_row_group(g))
                    .map_err(|why| damaged(&file, Some(row), &why))?;
                let mut iter = decode(|| rows.get_row_iter(Some(ids.clone())))
                    .map_err(|why| damaged(&file, Some(row), &why))?;
                while let Some(r) = decode(|| iter.next().transpose())
                    .map_err(|why| damaged(&file, Some(row), &why))?
                {
                    if let Field::Str(id) = field(&r, "id") {
                        images.index.entry(id.clone()).or_insert((s, g, row));
                    }
                    row += 1;
                }
            }
            images.shards.push(Shard {
                file,
                projection,
                image_struct,
            });
        }
        Ok(images)
    }

    /// Extracts the images of `ids` that the index holds and are not extracted yet, reading
    /// only the row groups that hold them. An image that is not usable is remembered as such
    /// (its questions are bad records); a cache that cannot be written is an error.
    fn extract<'a>(
        &mut self,
        ids: impl Iterator<Item = &'a str>,
        cache: &Path,
        decode_images: bool,
    ) -> anyhow::Result<()> {
        // Shard → row group → row in the shard → id.
        let mut wanted: BTreeMap<usize, BTreeMap<usize, HashMap<usize, String>>> = BTreeMap::new();
        for id in ids {
            if let (false, Some(&(s, g, row))) =
                (self.extracted.contains_key(id), self.index.get(id))
            {
                wanted
                    .entry(s)
                    .or_default()
                    .entry(g)
                    .or_default()
                    .insert(row, id.to_string());
            }
        }
        for (s, groups) in wanted {
            let shard = &self.shards[s];
            let file = &shard.file;
            let reader = open(file)?;
            for (g, mut rows) in groups {
                let first: usize = (0..g)
                    .map(|i| {
                        usize::try_from(reader.metadata().row_group(i).num_rows()).unwrap_or(0)
                    })
                    .sum();
                let group = decode(|| reader.get_row_group(g))
                    .map_err(|why| damaged(file, Some(first), &why))?;
                let mut iter = decode(|| group.get_row_iter(Some(shard.projection.clone())))
                    .map_err(|why| damaged(file, Some(first), &why))?;
                let mut row = first;
                while !rows.is_empty() {
                    let Some(r) = decode(|| iter.next().transpose())
                        .map_err(|why| damaged(file, Some(row), &why))?
                    else {
                        break;
                    };
                    if let Some(id) = rows.remove(&row) {
                        let bytes = match (shard.image_struct, field(&r, "image")) {
                            (true, Field::Group(image)) => match field(image, "bytes") {
                                Field::Bytes(b) => Some(b.data()),
                                _ => None,
                            },
                            (false, Field::Bytes(b)) => Some(b.data()),
                            _ => None,
                        };
                        let name = format!("{id} ({} row {row})", file.display());
                        let image = match bytes {
                            None => Err(format!(
                                "its image {name} is not embedded (no bytes); bella-vqa reads \
                                 GQA's images from Parquet only as bytes"
                            )),
                            Some(bytes) => match extract(bytes, &name, decode_images, cache) {
                                Ok(path) => Ok(path),
                                Err(Bad::Io(e)) => return Err(e),
                                Err(Bad::Row(reason) | Bad::Question(_, reason)) => Err(reason),
                            },
                        };
                        self.extracted.insert(id, image);
                    }
                    row += 1;
                }
                // Rows the index placed here and the group does not hold: the file changed.
                for (row, id) in rows {
                    let reason = format!(
                        "its image {id} ({} row {row}) could not be read (the file changed \
                         while it was read?)",
                        file.display()
                    );
                    self.extracted.insert(id, Err(reason));
                }
            }
        }
        Ok(())
    }

    /// The cache file of the image `id` (extracted by [`ImagesFile::extract`]), or why there is
    /// none.
    fn image(&self, id: &str) -> Result<PathBuf, String> {
        match self.extracted.get(id) {
            Some(image) => image.clone(),
            None => Err(format!(
                "its image {id} (\"imageId\") is not in {}: no row of its \"id\" column holds it",
                self.given.display()
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------

/// Why a row gives no example.
enum Bad {
    /// Before its id is known.
    Row(String),
    Question(String, String),
    /// Not the row's fault (the image cache cannot be written): stops the read.
    Io(anyhow::Error),
}

impl Bad {
    /// The complaint, naming the question `id`.
    fn of(self, id: &str) -> Bad {
        match self {
            Bad::Row(reason) => Bad::Question(id.to_string(), reason),
            other => other,
        }
    }
}

/// Where a row's image is looked up and its bytes go.
struct ImageSource<'a> {
    /// The images folder.
    dir: &'a Path,
    /// The image cache.
    cache: &'a Path,
    /// Decode embedded images (`ReadOptions::check_images`), not only read their header.
    decode: bool,
    /// GQA's images as Parquet, when `--images` names them and the file's questions are GQA's.
    gqa: Option<&'a ImagesFile>,
}

/// A row's field `name` (null when the row has no such field).
fn field<'a>(row: &'a Row, name: &str) -> &'a Field {
    row.get_column_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, f)| f)
        .unwrap_or(&Field::Null)
}

/// The example of the row `row_index` of `file`, and whether its image is checked already (an
/// embedded image is checked as it is extracted, and named by its file and row).
fn example(
    row: &Row,
    columns: &Columns,
    position: usize,
    file: &Path,
    row_index: usize,
    images: &ImageSource,
) -> Result<(VqaExample, bool), Bad> {
    let get = |name: &str| field(row, name);
    let question_id = match &columns.id {
        None => position.to_string(),
        Some(name) => match get(name) {
            Field::Str(s) if !s.trim().is_empty() => s.clone(),
            Field::Str(_) => {
                return Err(Bad::Row(format!(
                    "\"{name}\" is empty; give every question a unique id"
                )))
            }
            Field::Null => {
                return Err(Bad::Row(format!(
                    "\"{name}\" is null; give every question a unique id"
                )))
            }
            other => match integer(other) {
                Some(n) => n,
                None => return Err(Bad::Row(format!("\"{name}\" is not an id: {other}"))),
            },
        },
    };
    let bad = |reason: String| Bad::Question(question_id.clone(), reason);
    let question = match get(&columns.question) {
        Field::Str(s) if !s.trim().is_empty() => s.clone(),
        Field::Null => return Err(bad("the question is null".into())),
        _ => return Err(bad("the question is empty".into())),
    };
    let answers = match &columns.answers {
        AnswerColumn::None => Vec::new(),
        AnswerColumn::One(name) => match get(name) {
            Field::Str(s) if !s.trim().is_empty() => vec![s.clone()],
            Field::Null => Vec::new(),
            _ => {
                return Err(bad(format!(
                    "\"{name}\" is empty; give the answer (or null)"
                )))
            }
        },
        AnswerColumn::List(name) => answer_list(get(name)).map_err(&bad)?,
    };
    if answers.len() > MAX_ANSWERS {
        return Err(bad(format!(
            "{} answers; a question holds at most {MAX_ANSWERS} human answers",
            answers.len()
        )));
    }
    let answer_type = match columns.answer_type.as_deref().map(get) {
        Some(Field::Str(s)) => Some(s.clone()),
        _ => None,
    };
    // Embedded bytes are named by their file and row in messages (not by their cache file).
    let embedded = |bytes: &[u8]| {
        let name = format!("{} row {row_index}", file.display());
        extract(bytes, &name, images.decode, images.cache).map_err(|e| e.of(&question_id))
    };
    let (image, checked) = match &columns.image {
        ImageColumn::Struct(name) => match get(name) {
            Field::Group(image) => match (field(image, "bytes"), field(image, "path")) {
                (Field::Bytes(b), _) => (embedded(b.data())?, true),
                (_, Field::Str(p)) if !p.trim().is_empty() => {
                    (image_file(images.dir, p).map_err(&bad)?, false)
                }
                _ => return Err(bad("its image has neither bytes nor a path".into())),
            },
            _ => return Err(bad("its image is null".into())),
        },
        ImageColumn::Binary(name) => match get(name) {
            Field::Bytes(b) => (embedded(b.data())?, true),
            _ => return Err(bad("its image is null".into())),
        },
        ImageColumn::Path(name) => match get(name) {
            Field::Str(p) if !p.trim().is_empty() => {
                (image_file(images.dir, p).map_err(&bad)?, false)
            }
            _ => return Err(bad("its image path is null or empty".into())),
        },
        ImageColumn::GqaImageId(name) => match (gqa_image_id(row, name), images.gqa) {
            (Some(id), Some(gqa)) => (gqa.image(id).map_err(&bad)?, true),
            (Some(id), None) => (
                find_image(images.dir, &format!("{id}.jpg"), &["images"]).map_err(&bad)?,
                false,
            ),
            (None, _) => return Err(bad(format!("\"{name}\" is null or empty"))),
        },
    };
    let mut extra = Map::new();
    for name in &columns.extra {
        extra.insert(name.clone(), get(name).to_json_value());
    }
    let example = VqaExample {
        question_id,
        image,
        question,
        answers,
        answer_type,
        extra,
    };
    Ok((example, checked))
}

/// An integer field as the decimal text of the id.
fn integer(f: &Field) -> Option<String> {
    Some(match f {
        Field::Byte(n) => n.to_string(),
        Field::Short(n) => n.to_string(),
        Field::Int(n) => n.to_string(),
        Field::Long(n) => n.to_string(),
        Field::UByte(n) => n.to_string(),
        Field::UShort(n) => n.to_string(),
        Field::UInt(n) => n.to_string(),
        Field::ULong(n) => n.to_string(),
        _ => return None,
    })
}

/// The answers of a list of strings or of `{answer, …}` structs (null: none, a test set's).
fn answer_list(f: &Field) -> Result<Vec<String>, String> {
    let list = match f {
        Field::Null => return Ok(Vec::new()),
        Field::ListInternal(list) => list.elements(),
        other => return Err(format!("\"answers\" is not a list: {other}")),
    };
    let answers = list
        .iter()
        .enumerate()
        .map(|(i, a)| match a {
            Field::Str(s) => Ok(s.clone()),
            Field::Group(answer) => answer
                .get_column_iter()
                .find_map(|(n, f)| match (n.as_str(), f) {
                    ("answer", Field::Str(s)) => Some(s.clone()),
                    _ => None,
                })
                .ok_or_else(|| format!("answers[{i}] has no \"answer\" string")),
            other => Err(format!("answers[{i}] is not a string: {other}")),
        })
        .collect::<Result<Vec<String>, String>>()?;
    if !answers.is_empty() && answers.iter().all(|a| a.trim().is_empty()) {
        return Err(
            "every answer is empty: give the human answers (or null for a test set)".into(),
        );
    }
    Ok(answers)
}

/// An image named by its path: in the images folder (the path as given, then its file name,
/// since `datasets` keeps the path of the machine that made the data set).
fn image_file(image_dir: &Path, path: &str) -> Result<PathBuf, String> {
    let given = resolve(image_dir, Path::new(path));
    let by_name = Path::new(path).file_name().map(|n| image_dir.join(n));
    [Some(given.clone()), by_name]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "its image is not embedded (no bytes) and its file {path} is not in {}; give \
                 the folder that holds the images (--images for --data, --val-images for --val, \
                 --ood-images for --ood-data, --ood-val-images for --ood-val)",
                image_dir.display()
            )
        })
}

/// Checks embedded image bytes as the data's image files are checked
/// ([`crate::models::image::check_image_bytes`]: the header, or with `decode` the whole image;
/// `name`, where they are, names them in messages), then writes them to
/// `<cache>/<sha256>.<ext>` unless that file is there, and returns its path. Bytes that are no
/// usable image are the row's fault ([`Bad::Row`]); a cache that cannot be written is not
/// ([`Bad::Io`]).
fn extract(bytes: &[u8], name: &str, decode: bool, cache: &Path) -> Result<PathBuf, Bad> {
    let format = crate::models::image::check_image_bytes(bytes, name, decode)
        .map_err(|e| Bad::Row(format!("its image cannot be used: {e:#}")))?;
    let ext = format.extensions_str().first().copied().unwrap_or("img");
    let path = cache.join(format!("{}.{ext}", crate::io::sha256_bytes(bytes)));
    // Content-addressed: a file of the same name and size holds these bytes (it was renamed
    // into place whole), so it is not written again.
    if fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64) {
        return Ok(path);
    }
    // A cache file, not an output of the run: written atomically, outside the fault injector's
    // count of the run's file operations.
    crate::io::write_stream_atomically(&path, |w| {
        w.write_all(bytes)
            .with_context(|| format!("cannot write {}", path.display()))
    })
    .with_context(|| {
        format!(
            "cannot save an image of the data to the image cache {} (set BELLA_VQA_CACHE to a \
             writable folder)",
            cache.display()
        )
    })
    .map_err(Bad::Io)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_of_datasets_old_and_new() {
        assert_eq!(
            shard_name("validation-00003-of-00068"),
            Some(("validation".into(), 3, 68))
        );
        assert_eq!(
            shard_name("test-dev-00000-of-00001-8f9c2b1e4d6a7f0b"),
            Some(("test-dev".into(), 0, 1))
        );
        assert_eq!(shard_name("validation"), None);
        assert_eq!(shard_name("0000"), None);
        assert_eq!(shard_name("validation-00068-of-00068"), None);
    }
}
