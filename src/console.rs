//! What the command line writes: [`note!`](crate::note) for status lines on standard error and
//! [`out!`](crate::out) for the product on standard output.
//!
//! `println!` and `eprintln!` panic when the write fails: a log redirected to a full disk
//! (`2>> run.log`), `> /dev/full`, or a reader that went away (`| head -1`) killed a run after
//! its work, or the server's worker mid-request. A status line that cannot be written is dropped
//! (it is not the product, and nothing else could say so); an answer that cannot be written is
//! an error ([`StdoutError`]), and a reader that closed the pipe ends the program quietly.

use std::io::ErrorKind;

/// Standard output (or a pipe given as an output file, `--out /dev/stdout`) could not be
/// written: the command's product is lost, unless its reader closed the pipe.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output")]
pub struct StdoutError(#[source] pub std::io::Error);

impl StdoutError {
    /// The reader closed the pipe (`bella-vqa inspect | head -1`): it has what it wanted.
    pub fn is_closed_pipe(&self) -> bool {
        self.0.kind() == ErrorKind::BrokenPipe
    }
}

/// A number for a message or a stored description: at most 10 significant digits (no
/// floating-point noise: 1 − 0.999999 is 1e-6, not 1.0000000000287557e-6), and in scientific
/// notation when very small or large (`{}` would write 1e-300 with 300 digits).
pub fn number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let trim = |s: &str| s.trim_end_matches('0').trim_end_matches('.').to_string();
    // The exponent after rounding to 10 digits (9.99999999999e-5 is 1e-4).
    let scientific = format!("{x:.9e}");
    let Some((mantissa, exponent)) = scientific.split_once('e') else {
        return scientific;
    };
    match exponent.parse::<i32>() {
        Ok(e) if (-4..15).contains(&e) => {
            let fixed = format!("{x:.*}", (9 - e).max(0) as usize);
            if fixed.contains('.') {
                trim(&fixed)
            } else {
                fixed
            }
        }
        _ => format!("{}e{exponent}", trim(mantissa)),
    }
}

/// Writes a status line to standard error (a line, as `eprintln!`); a failed write is dropped.
/// Control characters other than line breaks and tabs are escaped ([`on_terminal`](crate::console::on_terminal)): a status
/// line quotes paths and inputs, and a file named with an escape sequence must not drive the
/// terminal that shows the message.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!($($arg)*);
        let _ = writeln!(std::io::stderr(), "{}", $crate::console::on_terminal(&line));
    }};
}

/// Writes a line of the command's product to standard output (as `println!`), returning
/// `Result<(), StdoutError>`.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err($crate::console::StdoutError)
    }};
}

/// `text` as it may be shown on a terminal: control characters (escape sequences, bell,
/// backspace, which a model can generate and a terminal would act on) written as Rust escapes
/// (`\u{1b}`), everything else as it is.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    escape(text, char::is_control)
}

/// `text` as a status line may show it: as [`printable`], but line breaks and tabs kept (a
/// message may span lines on purpose).
pub fn on_terminal(text: &str) -> std::borrow::Cow<'_, str> {
    escape(text, |c| c.is_control() && c != '\n' && c != '\t')
}

/// `text` with the characters `escaped` picks written as Rust escapes.
fn escape(text: &str, escaped: impl Fn(char) -> bool) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(&escaped) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if escaped(c) {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// How often a [`Progress`] writes its plain line where no bar is drawn.
const PLAIN_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// A progress bar on standard error: indicatif's where it draws one (a terminal). Where it draws
/// nothing (a CI log, `2> run.log`), a long run would be silent until its end, which a log
/// watchdog takes for a hang: a plain line says how far it is instead, at the first step and then
/// at most every 30 seconds.
pub struct Progress {
    bar: indicatif::ProgressBar,
    /// What is counted ("questions", "steps"); `None` without plain lines.
    plain: Option<(&'static str, std::sync::Mutex<PlainState>)>,
}

struct PlainState {
    last: Option<std::time::Instant>,
    message: String,
}

impl Progress {
    /// A bar of `len` `unit`s in indicatif's `template` (a bar that shows nothing unless
    /// `show`), starting at `start`.
    pub fn new(show: bool, len: u64, start: u64, unit: &'static str, template: &str) -> Self {
        if !show {
            return Self {
                bar: indicatif::ProgressBar::hidden(),
                plain: None,
            };
        }
        let bar = indicatif::ProgressBar::new(len);
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            // `{rate}`: units a second to one decimal (indicatif's `{per_sec}` shows four).
            let rate = |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.1}/s", s.per_sec());
            };
            bar.set_style(style.with_key("rate", rate).progress_chars("=> "));
        }
        bar.set_position(start);
        let plain = bar.is_hidden().then(|| {
            let state = PlainState {
                last: None,
                message: String::new(),
            };
            (unit, std::sync::Mutex::new(state))
        });
        Self { bar, plain }
    }

    pub fn set_message(&self, message: impl Into<String>) {
        let message: String = message.into();
        if let Some((_, state)) = &self.plain {
            if let Ok(mut s) = state.lock() {
                s.message.clone_from(&message);
            }
        }
        self.bar.set_message(message);
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.plain_line();
    }

    pub fn set_position(&self, position: u64) {
        self.bar.set_position(position);
        self.plain_line();
    }

    /// Runs `f` (which writes to standard error) with the bar out of the way.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
    }

    fn plain_line(&self) {
        let Some((unit, state)) = &self.plain else {
            return;
        };
        let Ok(mut s) = state.lock() else {
            return;
        };
        if s.last.is_some_and(|t| t.elapsed() < PLAIN_PROGRESS_EVERY) {
            return;
        }
        s.last = Some(std::time::Instant::now());
        let (done, len) = (self.bar.position(), self.bar.length().unwrap_or(0));
        let percent = 100.0 * done as f64 / len.max(1) as f64;
        let left = if done > 0 && done < len {
            format!(", about {} left", indicatif::HumanDuration(self.bar.eta()))
        } else {
            String::new()
        };
        let message = match s.message.as_str() {
            "" => String::new(),
            m => format!(" ({m})"),
        };
        crate::note!(
            "{done}/{len} {unit}{message}: {percent:.0} % after {}{left}",
            indicatif::HumanDuration(self.bar.elapsed())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{number, on_terminal, printable};

    #[test]
    fn numbers_are_short_and_read_back_as_written() {
        let cases = [
            (0.05, "0.05"),
            (0.9, "0.9"),
            (1.0 - 0.999999, "1e-6"),
            (1.0 - 0.9999, "0.0001"),
            (1.0 - 0.1, "0.9"),
            (1e-300, "1e-300"),
            (5e-324, "4.940656458e-324"),
            (2.5e-5, "2.5e-5"),
            (123456.0, "123456"),
            (1e20, "1e20"),
            (-0.25, "-0.25"),
            (0.0, "0"),
        ];
        for (x, written) in cases {
            assert_eq!(number(x), written, "{x:e}");
            let back: f64 = written.parse().unwrap();
            assert!(
                (back - x).abs() <= 1e-9 * x.abs(),
                "{written} reads as {back}"
            );
        }
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            printable("red \u{1b}[2J\u{7}\u{8}é"),
            "red \\u{1b}[2J\\u{7}\\u{8}é"
        );
        assert_eq!(printable("a\nb\tc"), "a\\nb\\tc");
        assert!(matches!(
            printable("plain ✓"),
            std::borrow::Cow::Borrowed("plain ✓")
        ));
    }

    #[test]
    fn status_lines_keep_their_line_breaks_and_escape_the_rest() {
        assert_eq!(
            on_terminal("cannot read /tmp/a\u{1b}]0;pwned\u{7}.png\n  hint:\tuse PNG\r"),
            "cannot read /tmp/a\\u{1b}]0;pwned\\u{7}.png\n  hint:\tuse PNG\\r"
        );
    }
}
