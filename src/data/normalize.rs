//! The official VQA answer normalisation.
//!
//! This reproduces, step by step, what the official VQA evaluation code
//! (`PythonEvaluationTools/vqaEvaluation/vqaEval.py` of `GT-Vision-Lab/VQA`, Python 2) does to an
//! answer before comparing it with the human answers:
//!
//! 1. [`clean_whitespace`]: `'\n'` and `'\t'` become spaces, then the text is stripped;
//! 2. [`process_punctuation`]: the punctuation characters ``; / [ ] " { } ( ) = + \ _ - > < @ ` , ? !``
//!    are removed (when the character is next to a space somewhere in the text, or when the text
//!    contains a digit-comma-digit such as `10,000`) or replaced by a space (otherwise); then up
//!    to 32 periods that are not followed by a digit are removed;
//! 3. [`process_digit_article`]: lower-case, split on whitespace, number words `none zero one … ten`
//!    become digits, the articles `a an the` are dropped, the contractions table is applied to
//!    each word (`dont` → `don't`), and the words are joined with single spaces.
//!
//! The quirks of the official code are kept on purpose, because they decide what counts as a match:
//! - the period regex is `(?!<=\d)(\.)(?!\d)`: its first group is a negative *lookahead* for the
//!   literal `<=` and a digit (a typo for a lookbehind), so it never rejects anything; a period is
//!   kept only when a digit follows it (`2.5` stays, `1.` and `.5.` lose the last period);
//! - that regex is called as `periodStrip.sub("", text, re.UNICODE)`, which passes `re.UNICODE`
//!   (= 32) as the `count` argument: only the first 32 such periods are removed;
//! - the "is this punctuation next to a space" test looks at the text as it was *before* any
//!   punctuation was processed, and the digit-comma-digit test turns replacement into removal for
//!   every punctuation character (`"1,000/2"` → `"10002"`);
//! - `%`, `:`, `'`, `#`, `$`, `&`, `*`, `^`, `~`, `|` are not in the list and survive;
//! - numbers are mapped before articles are dropped, and contractions are looked up after
//!   lower-casing, so the table's capitalised keys (`Im`, `Ive`, `Id've`) never match.
//!
//! Character classes follow the official code as it runs (Python 2, answers read by `json` as
//! `unicode`): `\d` is ASCII `0-9` (the patterns are compiled without `re.UNICODE`; under
//! Python 3 it would also match other Unicode digits), whitespace for `strip`/`split` is Python's
//! (Unicode White_Space plus the separators `U+001C..U+001F` and, as in Python 2's Unicode
//! database, `U+180E`), and lower-casing is per character (Python 2's simple case mapping: no
//! final-sigma rule, `İ` → `i`).
//!
//! The expected outputs in `tests/fixtures/metrics/normalization.tsv` come from running the official
//! file itself under Python 2.7 (see `scripts/metrics_reference.py`).

/// The punctuation list of the official code, in its order.
pub const PUNCTUATION: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// Number words and their digits (`manualMap`).
pub const NUMBER_WORDS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

/// The articles that are dropped.
pub const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// How many periods `periodStrip.sub("", text, re.UNICODE)` removes at most (`re.UNICODE == 32`
/// lands in the `count` argument).
pub const PERIOD_STRIP_COUNT: usize = 32;

/// The official contractions table (120 entries), sorted by key (byte order) for binary search.
/// The odd entries are official too (`somebody'd` → `somebodyd`, capitalised keys).
#[rustfmt::skip]
const CONTRACTIONS: [(&str, &str); 120] = [
    ("'ow'sat", "'ow's'at"), ("'ows'at", "'ow's'at"), ("I'dve", "I'd've"), ("Id've", "I'd've"),
    ("Im", "I'm"), ("Ive", "I've"), ("aint", "ain't"), ("arent", "aren't"), ("cant", "can't"),
    ("couldn'tve", "couldn't've"), ("couldnt", "couldn't"), ("couldnt've", "couldn't've"),
    ("couldve", "could've"), ("didnt", "didn't"), ("doesnt", "doesn't"), ("dont", "don't"),
    ("hadn'tve", "hadn't've"), ("hadnt", "hadn't"), ("hadnt've", "hadn't've"),
    ("hasnt", "hasn't"), ("havent", "haven't"), ("he'dve", "he'd've"), ("hed", "he'd"),
    ("hed've", "he'd've"), ("hes", "he's"), ("howd", "how'd"), ("howll", "how'll"),
    ("hows", "how's"), ("isnt", "isn't"), ("it'dve", "it'd've"), ("itd", "it'd"),
    ("itd've", "it'd've"), ("itll", "it'll"), ("let's", "let's"), ("maam", "ma'am"),
    ("mightn'tve", "mightn't've"), ("mightnt", "mightn't"), ("mightnt've", "mightn't've"),
    ("mightve", "might've"), ("mustnt", "mustn't"), ("mustve", "must've"), ("neednt", "needn't"),
    ("notve", "not've"), ("oclock", "o'clock"), ("oughtnt", "oughtn't"), ("ow's'at", "'ow's'at"),
    ("shant", "shan't"), ("she'dve", "she'd've"), ("she's", "she's"), ("shed've", "she'd've"),
    ("shouldn'tve", "shouldn't've"), ("shouldnt", "shouldn't"), ("shouldnt've", "shouldn't've"),
    ("shouldve", "should've"), ("somebody'd", "somebodyd"), ("somebody'dve", "somebody'd've"),
    ("somebodyd've", "somebody'd've"), ("somebodyll", "somebody'll"), ("somebodys", "somebody's"),
    ("someone'dve", "someone'd've"), ("someoned", "someone'd"), ("someoned've", "someone'd've"),
    ("someonell", "someone'll"), ("someones", "someone's"), ("something'dve", "something'd've"),
    ("somethingd", "something'd"), ("somethingd've", "something'd've"),
    ("somethingll", "something'll"), ("thats", "that's"), ("there'dve", "there'd've"),
    ("thered", "there'd"), ("thered've", "there'd've"), ("therere", "there're"),
    ("theres", "there's"), ("they'dve", "they'd've"), ("theyd", "they'd"),
    ("theyd've", "they'd've"), ("theyll", "they'll"), ("theyre", "they're"),
    ("theyve", "they've"), ("twas", "'twas"), ("wasnt", "wasn't"), ("we'dve", "we'd've"),
    ("wed've", "we'd've"), ("werent", "weren't"), ("weve", "we've"), ("whatll", "what'll"),
    ("whatre", "what're"), ("whats", "what's"), ("whatve", "what've"), ("whens", "when's"),
    ("whered", "where'd"), ("wheres", "where's"), ("whereve", "where've"),
    ("who'dve", "who'd've"), ("whod", "who'd"), ("whod've", "who'd've"), ("wholl", "who'll"),
    ("whos", "who's"), ("whove", "who've"), ("whyll", "why'll"), ("whyre", "why're"),
    ("whys", "why's"), ("wont", "won't"), ("wouldn'tve", "wouldn't've"), ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"), ("wouldve", "would've"), ("y'all'dve", "y'all'd've"),
    ("y'alld've", "y'all'd've"), ("y'allll", "y'all'll"), ("yall", "y'all"),
    ("yall'd've", "y'all'd've"), ("yall'll", "y'all'll"), ("you'dve", "you'd've"),
    ("youd", "you'd"), ("youd've", "you'd've"), ("youll", "you'll"), ("youre", "you're"),
    ("youve", "you've"),
];

/// The full official normalisation: [`clean_whitespace`], then [`process_punctuation`], then
/// [`process_digit_article`].
///
/// ```
/// use bella_vqa::data::normalize::normalize_answer;
/// assert_eq!(normalize_answer("Two dogs."), "2 dogs");
/// assert_eq!(normalize_answer(" The Cat\n"), "cat");
/// assert_eq!(normalize_answer("10,000"), "10000");
/// assert_eq!(normalize_answer("dont"), "don't");
/// ```
pub fn normalize_answer(answer: &str) -> String {
    process_digit_article(&process_punctuation(&clean_whitespace(answer)))
}

/// The first step the official evaluation applies to every answer, normalised or not:
/// `'\n'` and `'\t'` become spaces, then leading and trailing whitespace is stripped.
pub fn clean_whitespace(answer: &str) -> String {
    answer
        .replace(['\n', '\t'], " ")
        .trim_matches(is_py_space)
        .to_string()
}

/// `processPunctuation` of the official code (see the module documentation for its quirks).
pub fn process_punctuation(in_text: &str) -> String {
    let comma_between_digits = has_digit_comma_digit(in_text);
    let mut out = in_text.to_string();
    for &p in &PUNCTUATION {
        if !out.contains(p) {
            continue;
        }
        let next_to_space =
            in_text.contains(&format!("{p} ")) || in_text.contains(&format!(" {p}"));
        out = if next_to_space || comma_between_digits {
            out.replace(p, "")
        } else {
            out.replace(p, " ")
        };
    }
    strip_periods(&out, PERIOD_STRIP_COUNT)
}

/// `processDigitArticle` of the official code: lower-case, split on whitespace, number words to
/// digits, drop articles, apply the contractions table, join with single spaces.
pub fn process_digit_article(in_text: &str) -> String {
    let lowered = py2_lower(in_text);
    let words: Vec<&str> = lowered
        .split(is_py_space)
        .filter(|w| !w.is_empty())
        .map(|w| {
            NUMBER_WORDS
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, digit)| *digit)
        })
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| contraction(w).unwrap_or(w))
        .collect();
    words.join(" ")
}

/// The official contraction for one word, if it has one.
pub fn contraction(word: &str) -> Option<&'static str> {
    CONTRACTIONS
        .binary_search_by(|(k, _)| (*k).cmp(word))
        .ok()
        .map(|i| CONTRACTIONS[i].1)
}

/// `re.search("(\d)(\,)(\d)", text)` with ASCII digits.
fn has_digit_comma_digit(text: &str) -> bool {
    text.as_bytes()
        .windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == b',' && w[2].is_ascii_digit())
}

/// `re.compile("(?!<=\d)(\.)(?!\d)").sub("", text, count)`: removes the first `count` periods
/// that are not followed by an ASCII digit (the lookahead reads the original text).
fn strip_periods(text: &str, count: usize) -> String {
    let mut out = String::with_capacity(text.len());
    let mut removed = 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '.' && removed < count && !chars.peek().is_some_and(|n| n.is_ascii_digit()) {
            removed += 1;
            continue;
        }
        out.push(c);
    }
    out
}

/// Python's `unicode.isspace` (the set `strip()` and `split()` use): Unicode White_Space plus the
/// information separators U+001C..U+001F, and U+180E (a space separator in Python 2's Unicode 5.2
/// database).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c) || c == '\u{180e}'
}

/// Python 2 `unicode.lower()`: simple, per-character case mapping. It differs from Rust's
/// `str::to_lowercase` in two ways: no final-sigma rule, and `İ` (U+0130) maps to a plain `i`.
fn py2_lower(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\u{130}' {
            out.push('i');
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contractions_sorted_and_unique() {
        for w in CONTRACTIONS.windows(2) {
            assert!(w[0].0 < w[1].0, "{} !< {}", w[0].0, w[1].0);
        }
        for (k, v) in CONTRACTIONS {
            assert_eq!(contraction(k), Some(v));
        }
        assert_eq!(contraction("cat"), None);
    }
}
